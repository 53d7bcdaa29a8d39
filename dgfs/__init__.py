"""dgfs: an S3 bucket as a directory, with similar files stored as xdelta3 deltas."""

__version__ = "0.1.0"
