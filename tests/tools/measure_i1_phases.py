#!/usr/bin/env python3
"""Measured peak RSS of HiDream-I1 phases next to ``info``'s prediction, on a real-size pipeline.

``encode``: the four text encoders as a run uses them (``TextEncoders.encode``: one loaded at a
time, freed before the next), over a CFG pair of prompts; ``transformer``: the transformer's
load (``load_transformer``, ``-q`` quantizing as it streams). Each phase runs in a fresh process
so the kernel's high-water mark (``ru_maxrss``) is that phase's alone; the prediction is
``families.i1.memory.phase_peaks`` for the same precision, from headers only. Build the pipeline
with ``make_sparse_i1_checkpoint.py`` then ``make_sparse_i1_encoders.py`` (zero weights).

usage: measure_i1_phases.py PIPELINE_DIR PHASE {bf16,8,4} [--run]
  PHASE: encode, or one encoder (clip_l, clip_g, t5, llama), or transformer
  --run: also run the encoders on the prompts (slow on CPU); without it only loads are measured
"""
from __future__ import annotations

import argparse
import time

import mlx.core as mx

from hidream_mlx.memory import ru_maxrss_bytes
from hidream_mlx.memory import GiB, RUNTIME_BYTES
from hidream_mlx.families.i1 import memory as i1_memory
from hidream_mlx.families.i1.text_encoding import COMPONENTS, TextEncoders
from hidream_mlx.families.i1.weights import load_transformer

TEXTS = ["", "A cat holding a sign that says hello"]  # the CFG pair: negative, positive


def predicted(pipeline: str, phase: str, bits) -> int:
    model = i1_memory.I1Memory.from_source(pipeline)
    peaks = i1_memory.phase_peaks(model, bits, bits, 1024, 1024, cfg_pass=True, dtype_bytes=2, fused=False)
    if phase == "encode":
        return peaks.encode
    if phase == "transformer":
        return peaks.load
    weights = model.weights[phase]
    encoder_bits = bits if phase in i1_memory.QUANTIZABLE_ENCODERS else None
    return (weights.size(encoder_bits, 2).nbytes + weights.load_transient(encoder_bits, 2) + RUNTIME_BYTES
            + i1_memory.encoder_activations(phase, model.encoder_cfgs[phase], 2, 128, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline")
    ap.add_argument("phase", choices=["encode", "transformer", *COMPONENTS])
    ap.add_argument("bits", choices=["bf16", "8", "4"])
    ap.add_argument("--run", action="store_true")
    args = ap.parse_args()
    bits = None if args.bits == "bf16" else int(args.bits)
    start = time.perf_counter()
    if args.phase == "transformer":
        model = load_transformer(f"{args.pipeline}/transformer", mx.bfloat16, lazy=False, bits=bits)
        del model
    else:
        encoders = TextEncoders(args.pipeline, dtype=mx.bfloat16, quantize_bits=bits)
        names = list(COMPONENTS) if args.phase == "encode" else [args.phase]
        for name in names:
            if args.run:
                encoders.run(name, TEXTS)
            else:
                encoders.model(name)
            encoders.free(name)
    measured = ru_maxrss_bytes()
    expected = predicted(args.pipeline, args.phase, bits)
    print(f"{args.phase} {args.bits}{' run' if args.run else ' load'}: measured peak RSS {measured / GiB:.2f} GiB, "
          f"predicted {expected / GiB:.2f} GiB ({100 * (expected - measured) / measured:+.1f}%), "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
