"""The format's name and version, as every file records them."""

__all__ = ["FORMAT_MAGIC", "FORMAT_VERSION"]

FORMAT_MAGIC = "ml_playground.checkpoint"
FORMAT_VERSION = 3
"""The version this package writes. Older versions load through migrations; newer ones are refused."""
