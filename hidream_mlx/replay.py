"""Replay recorded reference cases through the generation code, for parity checks.

Each supported ``.npz`` format (see tests/fixtures/README.md) is recognised by its keys; the
recorded inputs go through the same model and sampler code that ``generate`` uses, and the
outputs are written under the recorded key names so they can be compared one to one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .transformer import HiDreamO1


class ReplayError(ValueError):
    """A case file we cannot replay."""


def prefix_length(token_types: np.ndarray) -> int:
    """Length of the autoregressive prefix; the prefix cache requires AR tokens to come first."""
    types = np.asarray(token_types).reshape(-1)
    n = int(np.argmax(types != 0)) if (types != 0).any() else types.size
    if (types[n:] == 0).any():
        raise ReplayError("token_types: autoregressive tokens must form a prefix of the sequence")
    return n


def predict_recorded(model: HiDreamO1, input_ids, position_ids, token_types, vinputs, timestep,
                     num_target: int | None = None) -> np.ndarray:
    """x_pred for one recorded forward: prefix cache, then the generation tokens."""
    positions = np.asarray(position_ids).reshape(3, -1)
    n_prefix = prefix_length(token_types)
    cache = model.encode_prefix(mx.array(np.asarray(input_ids)[:, :n_prefix]), positions[:, :n_prefix])
    out = model.denoise(cache, mx.array(np.asarray(timestep, np.float32)), mx.array(vinputs),
                        positions[:, n_prefix:], num_target=num_target)
    return np.array(out)


def _forward_prefixes(data) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in data.files if k.endswith(".vinputs")})


def replay_forward(model: HiDreamO1, data, model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in _forward_prefixes(data):
        out[f"{p}.x_pred"] = predict_recorded(
            model, data[f"{p}.input_ids"], data[f"{p}.position_ids"], data[f"{p}.token_types"],
            data[f"{p}.vinputs"], data[f"{p}.timestep"],
        )
    return out


def detect_format(data) -> str:
    keys = set(data.files)
    if _forward_prefixes(data):
        return "forward_t2i"
    if "noise_raw" in keys:
        return "dev_sampling"
    if "input_ids_cond" in keys:
        return "full_sampling"
    if "pixel_values" in keys:
        return "edit_forward"
    if "x_pred_first3" in keys:
        return "flow_match_sampling"
    raise ReplayError("unrecognised case file: expected the keys of forward_t2i, dev_sampling, "
                      "full_sampling, edit_forward or flow_match_sampling")


REPLAYERS: dict[str, Callable] = {"forward_t2i": replay_forward}


def replay_case(model: HiDreamO1, case: Path, model_dir: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(case, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ReplayError(f"{case}: not a readable .npz file ({e})") from None
    with data:
        kind = detect_format(data)
        if kind not in REPLAYERS:
            raise ReplayError(f"{case}: replaying {kind} files is not supported yet")
        return REPLAYERS[kind](model, data, Path(model_dir))
