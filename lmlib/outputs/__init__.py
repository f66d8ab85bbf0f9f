"""Outputs: the output contract (predictions.csv, metrics.json) and run manifests."""
