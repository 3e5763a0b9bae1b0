"""Editing and subject-driven generation: reference images, the Qwen3-VL image processor, layout boxes."""
