"""Quantization: plans and recipes, conversion to a self-describing folder, the fidelity report."""
