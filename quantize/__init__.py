"""Conversion entry point and shipped recipe files; the logic lives in ``hidream_mlx``."""
