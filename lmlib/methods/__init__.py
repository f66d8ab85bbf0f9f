"""Landmark methods: shared parts (targets, networks, decoders) and one module per method.

See :mod:`lmlib.methods.base` for what a method is; :func:`build_method` finds a method by name.
"""
from lmlib.methods.base import METHOD_NAMES, LandmarkMethod, Targets, build_method, masked_mean

__all__ = ["METHOD_NAMES", "LandmarkMethod", "Targets", "build_method", "masked_mean"]
