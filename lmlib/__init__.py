"""lmlib: anatomical landmark detection in 2D and 3D medical images.

Conventions used everywhere in the package:
- image arrays are indexed in ITK/MONAI order ``(x, y[, z])`` (a SimpleITK array transposed);
- landmark coordinates are ``(x, y[, z])``; in world millimetres unless a name says ``index``/``px``;
- world <-> index conversions follow SimpleITK (spacing, origin, direction) and live in
  :mod:`lmlib.data.geometry` only.
"""
__version__ = "0.1.0"
