"""Replay HiDream-I1 golden cases (tests/fixtures/i1-tiny/README.md) through our I1 code.

Each case is recognised by its keys and replayed in float32; the outputs carry the case's own
key names, so every array can be compared one to one:

* ``text_encoding``: the case's prompt and negative prompt through the folder's four encoders
  (``pos.*`` / ``neg.*``: token ids and masks, CLIP outputs, pooled, T5 and Llama stacks);
* ``transformer_forward``: the recorded inputs of each call through the transformer
  (``callN.output``) and what patchify makes of call1's latents (``patchify.*``);
* ``vae_decode``: the recorded latent through the VAE (``vae_input``, ``decoded``,
  ``image_float``, ``image``);
* ``full_sampling`` / ``dev_sampling`` / ``fast_sampling``: a free run as the pipeline did it,
  conditioned by encoding the case's prompt with the four encoders, from the recorded initial
  latents and (flash samplers) recorded per-step noise, with the settings the case records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.files import open_case
from hidream_mlx.family import ReplayError
from hidream_mlx.families.i1.sampling import (Conditioning, GlobalTorchNoise, Recipe, RecordedNoise,
                                            i1_schedule, sample)
from hidream_mlx.families.i1.text_encoding import (COMPONENTS, DEFAULT_MAX_SEQUENCE_LENGTH, TextEncoders,
                                                 prompt_embedding)
from hidream_mlx.families.i1.transformer import patchify
from hidream_mlx.families.i1.vae import to_uint8
from hidream_mlx.families.i1.weights import load_transformer, load_vae

# scheduler_class as the reference pipeline records it -> our sampler name
SAMPLERS = {"FlowUniPCMultistepScheduler": "unipc", "FlashFlowMatchEulerDiscreteScheduler": "flash"}
TRANSFORMER_INPUTS = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3",
                      "pooled_embeds")
# A schedule is ours when every timestep agrees to 1e-6 in sigma units.
TIMESTEP_TOL = 1e-3


def i1_case_kind(keys) -> Optional[str]:
    """The I1 case format of a set of npz keys, or None when they are not an I1 case."""
    keys = set(keys)
    if {"init_latents", "scheduler_class", "latents"} <= keys:
        return "sampling"
    if any(k.startswith("call") and k.endswith(".encoder_hidden_states_t5") for k in keys):
        return "transformer_forward"
    if {"pos.t5_embeds", "pos.llama_hidden_states"} <= keys:
        return "text_encoding"
    if {"latents", "scaling_factor", "shift_factor", "decoded"} <= keys:
        return "vae_decode"
    return None


# What each format needs beyond the keys that recognise it (outputs are not needed).
REQUIRED = {
    "text_encoding": ("prompt", "negative_prompt"),
    "transformer_forward": (),
    "vae_decode": (),
    "sampling": ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "shift"),
}


def _scalar(data, key: str):
    return data[key].item()


def _max_sequence_length(data, case: Path) -> int:
    """The tokenizers' padded length: the case's own scalar, else the run's manifest beside it,
    else the pipeline's default (128)."""
    if "max_sequence_length" in data.files:
        return int(_scalar(data, "max_sequence_length"))
    manifest = case.parent / "manifest.json"
    if manifest.is_file():
        try:
            params = json.loads(manifest.read_text()).get("params", {})
        except ValueError as e:
            raise ReplayError(f"{manifest}: not valid JSON ({e})") from None
        if isinstance(params, dict) and isinstance(params.get("max_sequence_length"), int):
            return params["max_sequence_length"]
    return DEFAULT_MAX_SEQUENCE_LENGTH


def _encoders(model_dir: Path, llama: Optional[Path], length: int) -> TextEncoders:
    if llama is None and not (model_dir / COMPONENTS["llama"][0]).is_dir():
        raise ReplayError(f"{model_dir}: no {COMPONENTS['llama'][0]}/ (the official release ships Llama "
                          "separately): give its folder with --llama PATH")
    return TextEncoders(model_dir, dtype=mx.float32, llama_dir=llama, max_sequence_length=length)


def replay_text_encoding(data, model_dir: Path, case: Path, llama: Optional[Path]) -> dict[str, np.ndarray]:
    """Both sides in one batch per encoder (rows [pos, neg]), one encoder resident at a time."""
    sides = [s for s in ("pos", "neg") if f"{s}.t5_embeds" in data.files]
    texts = [str(_scalar(data, "prompt" if s == "pos" else "negative_prompt")) for s in sides]
    encoders = _encoders(model_dir, llama, _max_sequence_length(data, case))
    out: dict[str, np.ndarray] = {}
    raw = {}
    for name in COMPONENTS:
        tokens = encoders.tokenize(name, texts)
        raw[name] = encoders.run(name, texts)
        encoders.free(name)
        for i, side in enumerate(sides):
            out[f"{side}.{name}.input_ids"] = np.asarray(tokens.input_ids[i:i + 1], np.int64)
            out[f"{side}.{name}.attention_mask"] = np.asarray(tokens.attention_mask[i:i + 1], np.int64)
    for i, side in enumerate(sides):
        row = slice(i, i + 1)
        for name in ("clip_l", "clip_g"):
            out[f"{side}.{name}.text_embeds"] = np.array(raw[name]["text_embeds"][row])
            out[f"{side}.{name}.last_hidden_state"] = np.array(raw[name]["last_hidden_state"][row])
        out[f"{side}.pooled_embeds"] = np.concatenate(
            [out[f"{side}.clip_l.text_embeds"], out[f"{side}.clip_g.text_embeds"]], axis=-1)
        out[f"{side}.t5_embeds"] = np.array(raw["t5"]["last_hidden_state"][row])
        out[f"{side}.llama_hidden_states"] = np.array(raw["llama"]["hidden_states"][:, row])
    return out


def _calls(data) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in data.files
                   if k.startswith("call") and k.endswith(".encoder_hidden_states_t5")})


def replay_transformer_forward(data, model_dir: Path, case: Path, llama: Optional[Path]) -> dict[str, np.ndarray]:
    model = load_transformer(model_dir / "transformer", mx.float32)
    out = {}
    for call in _calls(data):
        missing = [k for k in TRANSFORMER_INPUTS if f"{call}.{k}" not in data.files]
        if missing:
            raise ReplayError(f"{case.name}: {call} lacks {', '.join(f'{call}.{k}' for k in missing)}")
        inputs = [mx.array(data[f"{call}.{k}"]) for k in TRANSFORMER_INPUTS]
        out[f"{call}.output"] = np.array(model(*[x.astype(mx.float32) for x in inputs]))
    first = _calls(data)[0]
    p = patchify(mx.array(data[f"{first}.hidden_states"]), model.cfg.patch_size, model.cfg.max_seq)
    out["patchify.tokens"] = np.array(p.tokens)
    out["patchify.img_sizes"] = np.broadcast_to(np.array(p.grid, np.int64), (p.tokens.shape[0], 2)).copy()
    out["patchify.img_ids"] = np.array(p.ids)
    out["patchify.has_mask"] = np.array(p.mask is not None)
    if p.mask is not None:
        out["patchify.hidden_states_masks"] = np.array(p.mask)
    return out


def decode_outputs(vae, latents: mx.array) -> dict[str, np.ndarray]:
    """The pipeline's decode of transformer-space latents [1, C, h, w], under the case keys."""
    vae_input = vae.to_vae_space(latents.astype(mx.float32))
    decoded = vae.decode(vae_input)
    image_float = mx.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)[0]
    mx.eval(vae_input, decoded, image_float)
    return {"vae_input": np.array(vae_input), "decoded": np.array(decoded),
            "image_float": np.array(image_float), "image": np.array(to_uint8(image_float))}


def replay_vae_decode(data, model_dir: Path, case: Path, llama: Optional[Path]) -> dict[str, np.ndarray]:
    return decode_outputs(load_vae(model_dir / "vae", mx.float32), mx.array(data["latents"]))


def recorded_recipe(data, case: Path) -> Recipe:
    """The run's sampler and settings from the case's scalars."""
    name = str(_scalar(data, "scheduler_class"))
    if name not in SAMPLERS:
        raise ReplayError(f"{case.name}: scheduler_class {name!r} is not an I1 sampler "
                          f"({', '.join(SAMPLERS)})")
    return Recipe(SAMPLERS[name], int(_scalar(data, "num_inference_steps")),
                  float(_scalar(data, "guidance_scale")), float(_scalar(data, "shift")))


def _step_noise(data) -> Optional[Callable]:
    if "step_noise" in data.files:
        return RecordedNoise(data["step_noise"])
    if "global_seed" in data.files:
        return GlobalTorchNoise(int(_scalar(data, "global_seed")))
    return None


def replay_sampling(data, model_dir: Path, case: Path, llama: Optional[Path]) -> dict[str, np.ndarray]:
    """Encode, then sample, then decode: one phase resident at a time, as ``generate`` runs."""
    recipe = recorded_recipe(data, case)
    schedule = i1_schedule(recipe)
    if "timesteps" in data.files and (len(data["timesteps"]) != len(schedule) or np.abs(
            schedule.timesteps.astype(np.float64) - data["timesteps"]).max() > TIMESTEP_TOL):
        raise ReplayError(f"{case.name}: recorded timesteps are not those of a {recipe.sampler} schedule "
                          f"with {recipe.steps} steps and shift {recipe.shift:g}")
    encoders = _encoders(model_dir, llama, _max_sequence_length(data, case))
    emb = prompt_embedding(encoders, str(_scalar(data, "prompt")), str(_scalar(data, "negative_prompt")),
                           recipe.guidance)
    del encoders
    cond = Conditioning(emb.t5_embeds, emb.llama_hidden_states, emb.pooled_embeds)
    model = load_transformer(model_dir / "transformer", mx.float32)
    outputs, latents = [], []

    def on_step(i, output, x):
        if output is None:
            # The flash sampler skips its last model call (its result is unused); the reference
            # made it, so replay makes it too, to return every step's output.
            batch = mx.concatenate([x, x], axis=0) if recipe.uses_cfg else x
            t = mx.full((batch.shape[0],), float(schedule.timesteps[i]), dtype=mx.float32)
            output = model(batch, t, cond.t5, cond.llama_stack, cond.pooled)
        outputs.append(np.array(output))
        latents.append(np.array(x))

    final = sample(model, cond, mx.array(data["init_latents"]).astype(mx.float32), recipe, schedule,
                   _step_noise(data), on_step)
    del model
    out = {"timesteps": schedule.timesteps, "sigmas": np.asarray(schedule.sigmas, np.float32),
           "model_output": np.stack(outputs), "latents": np.stack(latents), "final_latents": np.array(final)}
    out.update(decode_outputs(load_vae(model_dir / "vae", mx.float32), final))
    return out


REPLAYERS: dict[str, Callable] = {
    "text_encoding": replay_text_encoding,
    "transformer_forward": replay_transformer_forward,
    "vae_decode": replay_vae_decode,
    "sampling": replay_sampling,
}


def replay_i1_case(model_dir: Path, case: Path, llama: Optional[Path] = None) -> dict[str, np.ndarray]:
    """Replay one I1 case file against the pipeline folder ``model_dir``."""
    model_dir, case = Path(model_dir), Path(case)
    with open_case(case) as data:
        kind = i1_case_kind(data.files)
        if kind is None:
            raise ReplayError(f"{case}: not a HiDream-I1 case (expected the keys of text_encoding, "
                              "transformer_forward, vae_decode or {full,dev,fast}_sampling)")
        missing = [k for k in REQUIRED[kind] if k not in data.files]
        if missing:
            raise ReplayError(f"{case}: a {kind} case without {', '.join(missing)}")
        return REPLAYERS[kind](data, model_dir, case, None if llama is None else Path(llama))
