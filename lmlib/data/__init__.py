"""Data layer: geometry, samples, readers, annotation checks, datasets, phantoms, deformations,
grids, transforms and loaders. Everything here works in world mm (x, y[, z])."""
