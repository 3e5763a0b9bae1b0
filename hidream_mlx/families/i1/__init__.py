"""HiDream-I1: the sparse-MoE transformer, the FLUX-style VAE and the four text encoders."""
