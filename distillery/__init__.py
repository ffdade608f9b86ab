"""distillery: distil dense object detectors from a precomputed label store."""

__version__ = "0.1.0"
