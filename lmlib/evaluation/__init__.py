"""Evaluation: radial errors and summary metrics in mm, statistics (tests, confidence intervals)."""
