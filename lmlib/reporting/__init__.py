"""Reporting: comparison tables and figures, data exploration."""
