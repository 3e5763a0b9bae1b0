"""HiDream-I1: four text encoders, a sparse-MoE transformer over VAE latents, from prompt to image (``family.py``)."""
