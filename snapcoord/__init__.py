"""snapcoord: consistent VM snapshots of database servers."""

__version__ = "0.1.0"
