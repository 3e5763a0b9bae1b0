"""``hidream-mlx replay``: run a recorded reference case through the generation code.

The model's family (``models.family``) picks the replayer: HiDream-O1 cases go through
``harness.replay`` (the checkpoint reached through ``ModelSource``), HiDream-I1 cases through
``harness.replay_i1`` (the pipeline and its Llama through ``I1Source``, as ``generate`` does).
A case of the other family is refused in one line before any weight loads.
"""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from hidream_mlx.files import atomic_output, check_output_path
from hidream_mlx.families.o1.replay import ReplayError, detect_format, open_case, replay_case
from hidream_mlx.families.i1.replay import i1_case_kind, replay_i1_case
from hidream_mlx.family import I1, LLAMA_REPO, family_of
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.weights.loading import load_model
from hidream_mlx.weights.source import ModelSource

FAMILY_NAMES = {I1: "HiDream-I1", "o1": "HiDream-O1"}


def case_family(case_path: Path):
    """``(family, format)`` of a case file by its keys; ``(None, None)`` when neither family's."""
    with open_case(case_path) as data:
        kind = i1_case_kind(data.files)
        if kind is not None:
            return I1, kind
        try:
            return "o1", detect_format(data)
        except ReplayError:
            return None, None


@click.command("replay")
@click.option("--model", "model_path", required=True,
              help="Model folder or repo id (O1: official or quantized layout; I1: a diffusers pipeline).")
@click.option("--case", "case_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A recorded case file (.npz in one of the fixture formats).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the replayed outputs (.npz).")
@click.option("--llama", "llama", metavar="PATH_OR_ID",
              help="I1 only: the Llama text encoder (a folder with its tokenizer, transformers or mlx-lm "
                   f"layout, or a repo id) for pipelines without text_encoder_4/ [default: {LLAMA_REPO}].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def replay(model_path, case_path, out_path, llama, overwrite):
    """Replay a recorded reference case in float32 and write our outputs under the same keys."""
    check_output_path(out_path, overwrite)
    if not case_path.is_file():
        raise FileNotFoundError(f"{case_path}: no such case file")
    model_family = family_of(model_path)
    case_fam, kind = case_family(case_path)
    if case_fam is None:
        raise ReplayError(f"{case_path}: unrecognised case file: expected the keys of an O1 case (forward_t2i, "
                          "dev_sampling, full_sampling, edit_forward, flow_match_sampling) or an I1 case "
                          "(text_encoding, transformer_forward, vae_decode, {full,dev,fast}_sampling)")
    if case_fam != model_family:
        raise ReplayError(f"{case_path}: a {FAMILY_NAMES[case_fam]} case ({kind}), but --model {model_path} "
                          f"is a {FAMILY_NAMES[model_family]} model")
    if llama is not None and model_family != I1:
        raise ReplayError("--llama: only HiDream-I1 pipelines take a separate Llama")
    if model_family == I1:
        source = I1Source.resolve(model_path, llama=llama)
        outputs = replay_i1_case(source.path, case_path, source.llama.folder)
    else:
        model_dir = ModelSource.resolve(model_path).path
        outputs = replay_case(load_model(model_dir, dtype=mx.float32), case_path, model_dir)
    with atomic_output(out_path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
    click.echo(f"wrote {len(outputs)} arrays to {out_path}")
