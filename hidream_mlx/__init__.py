"""HiDream-O1-Image in native Apple MLX."""

__version__ = "0.1.0"
