"""``hidream-mlx replay``: run a recorded reference case through the generation code."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np


@click.command("replay")
@click.option("--model", "model_path", required=True, help="Model folder (official or quantized layout).")
@click.option("--case", "case_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A recorded case file (.npz in one of the fixture formats).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the replayed outputs (.npz).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def replay(model_path, case_path, out_path, overwrite):
    """Replay a recorded reference case in float32 and write our outputs under the same keys."""
    import mlx.core as mx

    from hidream_mlx.files import atomic_output, check_output_path
    from hidream_mlx.models.loading import load_model
    from hidream_mlx.models.source import ModelSource

    check_output_path(out_path, overwrite)
    if not case_path.is_file():
        raise FileNotFoundError(f"{case_path}: no such case file")
    from hidream_mlx.harness.replay import replay_case

    model_dir = ModelSource.resolve(model_path).path
    model = load_model(model_dir, dtype=mx.float32)
    outputs = replay_case(model, case_path, model_dir)
    with atomic_output(out_path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
    click.echo(f"wrote {len(outputs)} arrays to {out_path}")
