"""Replay recorded reference cases through the generation code, for parity checks.

Each supported ``.npz`` format (see tests/fixtures/README.md) is recognised by its keys; the
recorded inputs go through the same model and sampler code that ``generate`` uses, and the
outputs are written under the recorded key names so they can be compared one to one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from hidream_mlx.family import ReplayError
from hidream_mlx.files import open_case
from hidream_mlx.families.o1.patches import patches_to_image
from hidream_mlx.families.o1.sampling import Conditioning, PromptState, prompt_state, sample, schedule_for
from hidream_mlx.families.o1.recipes import Recipe, get_recipe
from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.families.o1.vision import load_vision_tower


def prefix_length(token_types: np.ndarray) -> int:
    """Length of the autoregressive prefix; the prefix cache requires AR tokens to come first."""
    types = np.asarray(token_types).reshape(-1)
    n = int(np.argmax(types != 0)) if (types != 0).any() else types.size
    if (types[n:] == 0).any():
        raise ReplayError("token_types: autoregressive tokens must form a prefix of the sequence")
    return n


def recorded_state(model: HiDreamO1, input_ids, position_ids, token_types) -> PromptState:
    """A prompt's prefix cache and generation positions, from recorded ids and positions."""
    return prompt_state(model, input_ids, position_ids, prefix_length(token_types))


def predict_recorded(model: HiDreamO1, input_ids, position_ids, token_types, vinputs, timestep,
                     num_target: int | None = None) -> np.ndarray:
    """x_pred for one recorded forward: prefix cache, then the generation tokens."""
    state = recorded_state(model, input_ids, position_ids, token_types)
    out = model.denoise(state.cache, mx.array(np.asarray(timestep, np.float32)), mx.array(vinputs),
                        state.positions, num_target=num_target)
    return np.array(out)


def run_recorded(model: HiDreamO1, cond: Conditioning, recipe: Recipe, z0: np.ndarray,
                 noise_raw: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Free-running sampling from a recorded z[0]; returns every z and the final image."""
    step_noise = None if noise_raw is None else (lambda i, shape: mx.array(noise_raw[i]))
    zs = [np.asarray(z0, np.float32)]
    for step in sample(model, cond, recipe, mx.array(z0), step_noise=step_noise):
        mx.eval(step.latent)
        zs.append(np.array(step.latent))
    return {"z": np.stack(zs), "image": np.asarray(zs[-1][0])}


def _image(z: np.ndarray, data) -> np.ndarray:
    h, w, _ = data["image"].shape
    return patches_to_image(z, h, w)


def recorded_settings(case: Path, name: str) -> dict:
    """The run's settings from the ``manifest.json`` beside a case file (empty if there is none)."""
    manifest = case.parent / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        return json.loads(manifest.read_text()).get("files", {}).get("_meta", {}).get(name, {})
    except ValueError as e:
        raise ReplayError(f"{manifest}: not valid JSON ({e})") from None


def replay_dev(model: HiDreamO1, data, model_dir: Path, case: Path) -> dict[str, np.ndarray]:
    s_noise = np.unique(data["s_noise"])
    if s_noise.size != 1:
        raise ReplayError("dev_sampling: a per-step noise scale that changes over the run is not a released recipe")
    meta = recorded_settings(case, "dev_sampling")
    # dev and dev-2604 differ only in their noise settings; the recorded scale says which ran.
    name = "dev-2604" if float(s_noise[0]) == get_recipe("dev-2604").s_noise else "dev"
    recipe = get_recipe(name).with_overrides(steps=len(data["timesteps"]), s_noise=float(s_noise[0]),
                                              noise_clip=meta.get("noise_clip_std"))
    if not np.array_equal(schedule_for(recipe).timesteps, data["timesteps"]):
        raise ReplayError("dev_sampling: recorded timesteps are not the distilled Dev timesteps")
    cond = Conditioning(recorded_state(model, data["input_ids"], data["position_ids"], data["token_types"]))
    out = run_recorded(model, cond, recipe, data["z"][0], data["noise_raw"])
    out["image"] = _image(out["image"], data)
    return out


def replay_full(model: HiDreamO1, data, model_dir: Path, case: Path) -> dict[str, np.ndarray]:
    meta = recorded_settings(case, "full_sampling")
    recipe = get_recipe("full").with_overrides(steps=len(data["timesteps"]), guidance=meta.get("guidance_scale"),
                                               shift=meta.get("shift"))
    if not np.array_equal(schedule_for(recipe).timesteps, data["timesteps"]):
        raise ReplayError("full_sampling: recorded timesteps are not those of a UniPC schedule with this shift")
    cond = Conditioning(
        recorded_state(model, data["input_ids_cond"], data["position_ids_cond"], data["token_types_cond"]),
        recorded_state(model, data["input_ids_uncond"], data["position_ids_uncond"], data["token_types_uncond"]),
    )
    out = run_recorded(model, cond, recipe, data["z"][0])
    out["image"] = _image(out["image"], data)
    return out


def _forward_prefixes(data) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in data.files if k.endswith(".vinputs")})


def replay_forward(model: HiDreamO1, data, model_dir: Path, case: Path) -> dict[str, np.ndarray]:
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


def recorded_edit_state(model: HiDreamO1, vision, data) -> tuple[PromptState, dict[str, np.ndarray]]:
    """An editing prompt's state from recorded ids, positions and processor outputs, plus the
    vision tower outputs (under the recorded key names)."""
    embeds, deepstack = vision(mx.array(data["pixel_values"]), data["image_grid_thw"])
    state = prompt_state(model, data["input_ids"], data["position_ids"], prefix_length(data["token_types"]),
                         embeds.astype(model.dtype), deepstack)
    vision_out = {"cond_image_embeds": np.array(embeds)}
    vision_out.update({f"cond_deepstack_{j}": np.array(d) for j, d in enumerate(deepstack)})
    return state, vision_out


def _vision(model: HiDreamO1, model_dir: Path):
    return load_vision_tower(model_dir, model.config, mx.float32)


def replay_edit_forward(model: HiDreamO1, data, model_dir: Path, case: Path) -> dict[str, np.ndarray]:
    state, out = recorded_edit_state(model, _vision(model, model_dir), data)
    vinputs = mx.array(data["vinputs"])
    num_target = vinputs.shape[1] - data["ref_patches"].shape[1]
    for key, t in (("x_pred", data["timestep"]), ("x_pred_t05", np.array([0.5], np.float32))):
        out[key] = np.array(model.denoise(state.cache, mx.array(np.asarray(t, np.float32)), vinputs,
                                          state.positions, num_target=num_target))
    out["x_pred_all_vis"] = np.array(model.denoise(state.cache, mx.array(np.asarray(data["timestep"], np.float32)),
                                                   vinputs, state.positions))
    return out


def replay_flow_match(model: HiDreamO1, data, model_dir: Path, case: Path) -> dict[str, np.ndarray]:
    edit_path = case.parent / "edit_forward.npz"
    if not edit_path.is_file():
        raise ReplayError(f"{case.name}: flow_match_sampling replays need edit_forward.npz beside it")
    with np.load(edit_path, allow_pickle=False) as edit:
        state, _ = recorded_edit_state(model, _vision(model, model_dir), edit)
        ref = mx.array(edit["ref_patches"])
    recipe = get_recipe("dev-edit").with_overrides(steps=len(data["timesteps"]))
    if not np.array_equal(schedule_for(recipe).timesteps, data["timesteps"]):
        raise ReplayError("flow_match_sampling: recorded timesteps are not the distilled Dev timesteps")
    out = run_recorded(model, Conditioning(state, ref_patches=ref), recipe, data["z"][0])
    out["image"] = _image(out["image"], data)
    return out


REPLAYERS: dict[str, Callable] = {
    "edit_forward": replay_edit_forward,
    "flow_match_sampling": replay_flow_match,
    "forward_t2i": replay_forward,
    "dev_sampling": replay_dev,
    "full_sampling": replay_full,
}


def replay_case(model: HiDreamO1, case: Path, model_dir: Path) -> dict[str, np.ndarray]:
    with open_case(case) as data:
        kind = detect_format(data)
        return REPLAYERS[kind](model, data, Path(model_dir), Path(case))
