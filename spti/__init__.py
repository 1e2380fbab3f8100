"""spti: differentially private synthetic images via private textual intermediaries."""

__version__ = "0.1.0"
