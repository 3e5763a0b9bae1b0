"""``hidream-mlx replay``: run a recorded reference case through the generation code.

Each family recognises its own case formats and replays them (``Family.case_format``,
``Family.replay``); a case of another family than the model's is refused in one line before any
weight loads.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from hidream_mlx.families import family_of, registered
from hidream_mlx.family import ReplayError
from hidream_mlx.files import atomic_output, check_output_path, open_case


def case_family(case_path: Path):
    """``(family, format)`` of a case file by its keys; ``(None, None)`` when no family's."""
    try:
        data = open_case(case_path)
    except ValueError as e:
        raise ReplayError(str(e)) from None
    with data:
        for family in registered():
            kind = family.case_format(data)
            if kind is not None:
                return family, kind
    return None, None


@click.command("replay")
@click.option("--model", "model_path", required=True,
              help="Model folder or repo id (O1: official or quantized layout; I1: a diffusers pipeline; E1: the "
                   "E1.1 folder or the E1-Full checkpoint, or its base pipeline alone for the cases that need no "
                   "E1 weights).")
@click.option("--case", "case_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A recorded case file (.npz in one of the fixture formats).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the replayed outputs (.npz).")
@click.option("--llama", "llama", metavar="PATH_OR_ID",
              help="I1 and E1: the Llama text encoder (a folder with its tokenizer, transformers or mlx-lm "
                   "layout, or a repo id) for pipelines without text_encoder_4/ [default: meta-llama/Meta-Llama-3.1-8B-Instruct].")
@click.option("--base", "base", metavar="PATH_OR_ID",
              help="E1 only: the HiDream-I1-Full pipeline an E1 model edits on (as generate's --base) "
                   "[default: HiDream-ai/HiDream-I1-Full].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def replay(model_path, case_path, out_path, llama, overwrite, base=None):
    """Replay a recorded reference case in float32 and write our outputs under the same keys."""
    check_output_path(out_path, overwrite)
    if not case_path.is_file():
        raise FileNotFoundError(f"{case_path}: no such case file")
    model_family = family_of(model_path)
    case_fam, kind = case_family(case_path)
    if case_fam is None:
        raise ReplayError(f"{case_path}: unrecognised case file: expected the keys of an O1 case (forward_t2i, "
                          "dev_sampling, full_sampling, edit_forward, flow_match_sampling), an I1 case "
                          "(text_encoding, transformer_forward, vae_decode, {full,dev,fast}_sampling) or an E1 "
                          "case (edit_encoding, image_latents, edit_forward, e1_*_sampling)")
    if case_fam.name != model_family.name and model_family.name not in case_fam.replay_models:
        raise ReplayError(f"{case_path}: a {case_fam.title} case ({kind}), but --model {model_path} "
                          f"is a {model_family.title} model")
    options = {"llama": llama, "base": base}
    for name, value in options.items():
        if value is not None and name not in case_fam.load_options:
            users = [f.title for f in registered() if name in f.load_options]
            raise ReplayError(f"--{name}: only {' and '.join(users)} cases take it; this is a {case_fam.title} "
                              f"case ({kind})")
    outputs = case_fam.replay(model_path, case_path, {k: v for k, v in options.items() if v is not None})
    with atomic_output(out_path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
    click.echo(f"wrote {len(outputs)} arrays to {out_path}")
