"""Bits per weight, size on disk and predicted peak of each quantization recipe for the real
HiDream-O1 8B dims, computed (nothing is measured): shapes from an unevaluated skeleton of the
real-dims config, sizes from the memory model's ``quantized_bytes``, peaks from
``predict_peak_bytes`` (Metal, fused attention, bf16 activations).

    .venv/bin/python evals/quant_recipe_table.py
"""

from __future__ import annotations

from pathlib import Path

from hidream_mlx.memory import GiB, plan_weight_sizes
from hidream_mlx.families.o1.memory import predict_peak_bytes, skeleton_shapes
from hidream_mlx.families.o1.synthetic import synthetic_config
from hidream_mlx.quant.plans import is_decoder_linear, resolve_plan
from hidream_mlx.quant.recipes import BUILTIN_RECIPES, QuantRecipe

RECIPES = Path(__file__).resolve().parent.parent / "quantize" / "recipes"
ROWS = [("bf16", None, None), ("flat Q2", "flat", 2), ("flat Q3", "flat", 3), ("flat Q4", "flat", 4),
        ("flat Q5", "flat", 5), ("flat Q6", "flat", 6), ("flat Q8", "flat", 8),
        ("q4-selective", "q4-selective", None), ("q4-down8", "q4-down8", None),
        ("q4-selective-down8 (file)", "q4-selective-down8", None), ("q4-selective-bf16 (file)", "q4-selective-bf16", None),
        ("flat Q4 + --quantize-embeddings", "flat+emb", 4), ("q3-down8-embed (file)", "q3-down8-embed", None)]


def recipe(name: str) -> QuantRecipe:
    if name == "flat+emb":
        from dataclasses import replace

        return replace(BUILTIN_RECIPES["flat"], quantize_embeddings=True)
    return BUILTIN_RECIPES.get(name) or QuantRecipe.from_file(RECIPES / f"{name}.json")


def main() -> None:
    config = synthetic_config("real")
    shapes = [s for s in skeleton_shapes(config) if not s[0].startswith("lm_head")]
    matrices = {n[: -len(".weight")]: shape[1] for n, shape in shapes if n.endswith(".weight") and len(shape) == 2}
    print("| recipe | decoder bits/weight | size on disk (no vision tower) | peak 1024² | peak 2048² |")
    print("|---|---:|---:|---:|---:|")
    for label, name, bits in ROWS:
        layers = {} if name is None else resolve_plan(recipe(name), matrices, config.text.num_hidden_layers,
                                                      bits).layers
        sizes = plan_weight_sizes(shapes, layers)
        total = sum(s.nbytes for s in sizes.values())
        dec = [(n, sh) for n, sh in shapes if is_decoder_linear(n[: -len(".weight")])]
        dec_sizes = plan_weight_sizes(dec, layers)
        bpw = 8 * sum(s.nbytes for s in dec_sizes.values()) / sum(s.parameters for s in dec_sizes.values())
        peaks = [predict_peak_bytes(total, config.text, n, n, cfg_pass=False, fused_attention=True) for n in (1024, 2048)]
        print(f"| {label} | {bpw:.2f} | {total / GiB:.2f} GiB | {peaks[0] / GiB:.2f} GiB | {peaks[1] / GiB:.2f} GiB |")


if __name__ == "__main__":
    main()
