"""Model files and weights for every family: where they are, loading, precision, LoRA."""
