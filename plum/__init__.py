"""PLUM model layer: SIDs, data, model, training, retrieval and the CLI."""
__version__ = "0.1.0"
