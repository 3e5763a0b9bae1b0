"""Fixture access for the HiDream-I1 image-side tests.

``HIDREAM_I1_FIXTURES`` points the tests at another fixture set (same file formats, other
dims and sizes); every size is read from the set itself.
"""
import os
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

FIXTURES = Path(os.environ.get("HIDREAM_I1_FIXTURES", Path(__file__).parent / "fixtures" / "i1-tiny"))
TOL = 1e-4


@lru_cache(maxsize=None)
def golden(name: str):
    """A golden npz of the set, loaded once per session."""
    return dict(np.load(FIXTURES / name))


@lru_cache(maxsize=None)
def transformer():
    from hidream_mlx.families.i1.weights import load_transformer
    model = load_transformer(FIXTURES / "transformer", lazy=False)
    return model


@lru_cache(maxsize=None)
def vae():
    from hidream_mlx.families.i1.weights import load_vae
    return load_vae(FIXTURES / "vae", lazy=False)


def conditioning(case: dict):
    """The text inputs a sampling case gave the transformer, rebuilt from text_encoding.npz:
    batch [neg, pos] with CFG, [pos] without."""
    from hidream_mlx.families.i1.sampling import Conditioning
    text = golden("text_encoding.npz")
    sides = ["neg", "pos"] if bool(case["uses_cfg"]) else ["pos"]
    return Conditioning(
        t5=mx.array(np.concatenate([text[f"{s}.t5_embeds"] for s in sides], axis=0)),
        llama_stack=mx.array(np.concatenate([text[f"{s}.llama_hidden_states"] for s in sides], axis=1)),
        pooled=mx.array(np.concatenate([text[f"{s}.pooled_embeds"] for s in sides], axis=0)),
    )


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


class RecordingMoE(nn.Module):
    """Stands in for an MoE layer: keeps each call's input, then runs the layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x)
        return self.layer(x)


def record_moe_decisions(model, run):
    """``run()`` with every MoE layer's input recorded; returns (run's result, name -> (scores,
    0/1 selection) of each layer's first call, from its gate on the recorded input)."""
    blocks = [b.block for b in model.double_stream_blocks] + [b.block for b in model.single_stream_blocks]
    layers = [blk.ff_i for blk in blocks]
    names = [name for name, _ in model.moe_layers()]
    recorders = [RecordingMoE(layer) for layer in layers]
    try:
        for blk, rec in zip(blocks, recorders):
            blk.ff_i = rec
        result = run()
    finally:
        for blk, layer in zip(blocks, layers):
            blk.ff_i = layer
    return result, {name: layer.gate(rec.inputs[0]) for name, layer, rec in zip(names, layers, recorders)}
