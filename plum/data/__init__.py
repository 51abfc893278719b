"""Datasets, splits and item content for PLUM."""
