"""HiDream-O1-Image: config, the Qwen3-VL transformer with the pixel heads, the vision tower, synthetic weights."""
