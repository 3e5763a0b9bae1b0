"""Replay HiDream-E1 golden cases (tests/fixtures/e1-tiny/README.md) through our editing code.

Each case format is recognised by its keys and replayed in float32; outputs carry the case's
own key names, so every array compares one to one (the recorded inputs are written back as they
are; the ``dbg.*`` intermediates are not written):

* ``edit_encoding``: each prompt set (``<tag>.prompt``, ``.negative_prompt``, ``.target_prompt``)
  through the base's four encoders (``<tag>.pos.*``, ``<tag>.neg.*``, ``<tag>.target.pos.*``) and
  the stage batches as :func:`~.sampling.edit_texts` builds them;
* ``image_latents``: the source through each recipe's size rule and the VAE encoder;
* ``edit_forward``: the recorded transformer inputs (``callN.*``) through the E1 model's
  transformer at the case's ``max_seq`` (``callN.output``, ``callN.kept_negated``, ``patchify.*``);
* ``sampling``: a free edit as the pipeline ran it: the case's prompts encoded, the recorded
  pipeline image encoded, noise drawn from the case's seed, its scheduler config and settings.
  ``reload_keys_unaliased`` (the non-official swap) edits with the base's transformer and loads
  the E1.1 weights into it for the refine stage, through the same stage hook E1-Full uses.

``replay_e1`` is what the ``replay`` command runs (``--model`` an E1 model with ``--base``, or the
base pipeline alone for the cases that need no E1 weights); ``replay_e1_case`` takes the base
folder and, when a case needs the edit transformer, the :class:`~.source.E1Source`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from PIL import Image

from hidream_mlx.families.i1.e1.engine import load_edit_transformer
from hidream_mlx.families.i1.e1.recipes import E1_1, E1_FULL, E1_RECIPES, TARGET_MARKER, target_prompt
from hidream_mlx.families.i1.e1.sampling import (EDIT, REFINE, EditConditioning, edit_model_input, edit_texts,
                                                   image_rows, sample_edit)
from hidream_mlx.families.i1.e1.sizes import resize_source
from hidream_mlx.families.i1.e1.source import E1Source, EditScheduler, e1_model_kind, resolve_base
from hidream_mlx.families.i1.replay import TRANSFORMER_INPUTS, _encoders, _max_sequence_length, decode_outputs, \
    replay_text_encoding
from hidream_mlx.families.i1.sampling import Conditioning
from hidream_mlx.families.i1.source import resolve_llama
from hidream_mlx.families.i1.text_encoding import PromptEmbedding
from hidream_mlx.families.i1.transformer import patchify
from hidream_mlx.families.i1.vae import preprocess_uint8
from hidream_mlx.families.i1.weights import load_transformer_planned, load_vae
from hidream_mlx.family import ReplayError
from hidream_mlx.files import open_case
from hidream_mlx.noise import TorchRandn
from hidream_mlx.weights.loading import stream_into
from hidream_mlx.weights.lora import set_adapters_enabled

# A case's recipe tag -> the recipe whose size rule and defaults it ran (the README's prefixes).
TAGS = {"e1_1": E1_1, "e1_full": E1_FULL}
SCRIPTS = {"inference_e1_1.py": E1_1, "inference.py": E1_FULL}
ORDERS = ("cfg3_clip_cfg_norm", "cfg3_plain", "refine_cfg2")
ROLE_PROMPT = f"pos {TARGET_MARKER} target"
ROLES = {ROLE_PROMPT: "pos"}


def e1_case_kind(keys) -> Optional[str]:
    """The E1 case format of a set of npz keys, or None when they are not an E1 case."""
    keys = set(keys)
    if {"init_latents", "refine_start_step", "scheduler_config", "pipeline_image"} <= keys:
        return "sampling"
    if any(k.startswith("call") and k.endswith(".kept_negated") for k in keys):
        return "edit_forward"
    if any(k.endswith(".cfg3_clip_cfg_norm.order") for k in keys):
        return "edit_encoding"
    if "source_image" in keys and any(k.endswith(".image_latents_cfg3") for k in keys):
        return "image_latents"
    return None


def _text(data, key: str) -> str:
    return str(data[key].item())


def _tags(data, suffix: str) -> list[str]:
    return sorted({k[: -len(suffix)] for k in data.files if k.endswith(suffix) and k[: -len(suffix)] in TAGS})


class _Prompts:
    """An I1 ``text_encoding`` case made of one prompt set, for ``replay_text_encoding``."""

    def __init__(self, prompt: str, negative: Optional[str]):
        self.values = {"prompt": np.array(prompt), "negative_prompt": np.array(negative or "")}
        self.files = ["prompt", "negative_prompt", "pos.t5_embeds"] + (["neg.t5_embeds"] if negative is not None else [])

    def __getitem__(self, key):
        return self.values[key]


def _batch(sides: dict[str, dict], order: list[str]) -> dict[str, np.ndarray]:
    return {"t5": np.concatenate([sides[s]["t5_embeds"] for s in order], axis=0),
            "llama": np.concatenate([sides[s]["llama_hidden_states"] for s in order], axis=1),
            "pooled": np.concatenate([sides[s]["pooled_embeds"] for s in order], axis=0)}


def replay_edit_encoding(data, case: Path, base: Path, llama: Optional[Path], source) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for tag in _tags(data, ".prompt"):
        prompt, negative = _text(data, f"{tag}.prompt"), _text(data, f"{tag}.negative_prompt")
        encoded = replay_text_encoding(_Prompts(prompt, negative), base, case, llama)
        target = target_prompt(prompt)
        sides = {s: {k[len(s) + 1:]: v for k, v in encoded.items() if k.startswith(s + ".")} for s in ("pos", "neg")}
        if target != prompt:
            sides["target"] = {k[4:]: v for k, v in
                               replay_text_encoding(_Prompts(target, None), base, case, llama).items()}
            out.update({f"{tag}.target.pos.{k}": v for k, v in sides["target"].items()})
        else:
            sides["target"] = sides["pos"]
        out.update({f"{tag}.{k}": v for k, v in encoded.items()})
        out.update({f"{tag}.prompt": np.array(prompt), f"{tag}.negative_prompt": np.array(negative),
                    f"{tag}.target_prompt": np.array(target if target != prompt else "")})
        for name in ORDERS:
            recipe = E1_RECIPES[TAGS[tag]].with_overrides(guidance=2.0, clip_cfg_norm=name != "cfg3_plain")
            # edit_texts on stand-in texts names each row by its role, whatever the real texts are
            rows = edit_texts(ROLE_PROMPT, "neg", recipe)[1 if name == "refine_cfg2" else 0]
            order = [ROLES.get(t, t) for t in rows]
            out[f"{tag}.{name}.order"] = np.array(order)
            out.update({f"{tag}.{name}.{k}": v for k, v in _batch(sides, order).items()})
    return out


def _resize_size(data, case: Path, tag: str) -> tuple[int, int]:
    """The request size a tag ran at: the budget side ``image_size`` (E1.1), the exact resize
    (E1-Full: the manifest's ``resize_to``, else the recorded resized image's size)."""
    if TAGS[tag] == E1_1:
        side = int(data["image_size"].item())
        return side, side
    manifest = case.parent / "manifest.json"
    if manifest.is_file():
        resize = json.loads(manifest.read_text()).get("params", {}).get(tag, {}).get("resize_to")
        if resize:
            return int(resize[0]), int(resize[1])
    h, w = data[f"{tag}.resized_image"].shape[:2]
    return int(w), int(h)


def replay_image_latents(data, case: Path, base: Path, llama: Optional[Path], source) -> dict[str, np.ndarray]:
    vae = load_vae(base / "vae", mx.float32, lazy=False)
    image = Image.fromarray(np.asarray(data["source_image"]))
    out = {"scaling_factor": np.array(vae.cfg.scaling_factor), "shift_factor": np.array(vae.cfg.shift_factor),
           **{k: np.asarray(data[k]) for k in ("source_image", "image_size") if k in data.files}}  # the inputs
    for tag in _tags(data, ".image_latents_cfg3"):
        width, height = _resize_size(data, case, tag)
        resized = np.asarray(resize_source(image, E1_RECIPES[TAGS[tag]].size_rule, width, height))
        pixels = preprocess_uint8(resized)
        mean, logvar = vae.encode_moments(mx.array(pixels))
        latents = vae.to_model_space(mean)
        out.update({f"{tag}.resized_image": resized, f"{tag}.preprocessed_image": pixels,
                    f"{tag}.latent_dist_mean": np.array(mean), f"{tag}.latent_dist_std": np.array(mx.exp(0.5 * logvar)),
                    f"{tag}.image_latents": np.array(latents),
                    f"{tag}.image_latents_cfg3": np.array(image_rows(latents, True))})
    return out


def _need(source, kind: Optional[str], case: Path) -> E1Source:
    if source is None or (kind is not None and source.kind != kind):
        want = {E1_1: "an E1.1 model (a folder holding transformer/)", E1_FULL: "the E1-Full checkpoint",
                None: "an E1 model"}[kind]
        raise ReplayError(f"{case.name}: this case runs {want}; give it with --model (and the I1 pipeline as --base)")
    return source


def edit_transformer(source: E1Source):
    """The edit transformer in float32 (E1-Full: its partial tensors in, its LoRA beside)."""
    return load_edit_transformer(source, mx.float32)[0]


def replay_edit_forward(data, case: Path, base: Path, llama: Optional[Path], source) -> dict[str, np.ndarray]:
    model = edit_transformer(_need(source, None, case))
    max_seq = int(data["max_seq"].item())
    out = {}
    calls = sorted({k.split(".", 1)[0] for k in data.files if k.startswith("call") and k.endswith(".kept_negated")})
    for call in calls:
        missing = [k for k in TRANSFORMER_INPUTS if f"{call}.{k}" not in data.files]
        if missing:
            raise ReplayError(f"{case.name}: {call} lacks {', '.join(f'{call}.{k}' for k in missing)}")
        x = mx.array(data[f"{call}.hidden_states"]).astype(mx.float32)
        inputs = [mx.array(data[f"{call}.{k}"]).astype(mx.float32) for k in TRANSFORMER_INPUTS[1:]]
        output = model(x, *inputs, max_seq=max_seq)
        # The editing stage's CFG batch (3 rows) carries the source on the right half; refine (2) does not.
        width = x.shape[-1] // 2 if x.shape[0] == 3 else x.shape[-1]
        out.update({f"{call}.{k}": np.asarray(data[f"{call}.{k}"]) for k in TRANSFORMER_INPUTS})  # the inputs
        out[f"{call}.output"] = np.array(output)
        out[f"{call}.kept_negated"] = np.array(-output[..., :width])
    p = patchify(mx.array(data[f"{calls[0]}.hidden_states"]), model.cfg.patch_size, max_seq)
    out.update({"patchify.tokens": np.array(p.tokens), "patchify.img_ids": np.array(p.ids),
                "patchify.img_sizes": np.broadcast_to(np.array(p.grid, np.int64), (p.tokens.shape[0], 2)).copy(),
                "patchify.has_mask": np.array(p.mask is not None), "max_seq": np.array(max_seq)})
    if p.mask is not None:
        out["patchify.hidden_states_masks"] = np.array(p.mask)
    return out


def recorded_edit_recipe(data, kind: str):
    """The run's settings from the case's scalars, on the recipe of the model's kind."""
    return E1_RECIPES[kind].with_overrides(
        steps=int(data["num_inference_steps"].item()), guidance=float(data["guidance_scale"].item()),
        image_guidance=float(data["image_guidance_scale"].item()),
        refine_strength=float(data["refine_strength"].item()), clip_cfg_norm=bool(data["clip_cfg_norm"].item()))


def _stage_hook(model, source: E1Source, unaliased: bool) -> Callable[[str], None]:
    """The refine swap: E1-Full's LoRA off; the unaliased E1.1 variant loads E1.1's weights."""
    def on_stage(stage: str) -> None:
        if source.e1_full is not None:
            set_adapters_enabled(model, stage == EDIT)
        if unaliased and stage == REFINE:
            stream_into(model, source.index, mx.float32)
    return on_stage


def replay_sampling(data, case: Path, base: Path, llama: Optional[Path], source) -> dict[str, np.ndarray]:
    script = _text(data, "script") if "script" in data.files else None
    source = _need(source, SCRIPTS.get(script), case)
    unaliased = "reload_keys_unaliased" in data.files and bool(data["reload_keys_unaliased"].item())
    if unaliased and source.kind != E1_1:
        raise ReplayError(f"{case.name}: the unaliased swap loads E1.1 weights; give an E1.1 model")
    recipe = recorded_edit_recipe(data, source.kind)
    scheduler = EditScheduler.from_config(json.loads(_text(data, "scheduler_config")), f"{case.name}:scheduler_config")
    schedule = scheduler.schedule(recipe.steps)
    prompt, negative = _text(data, "prompt"), _text(data, "negative_prompt")
    edit_rows, refine_rows = edit_texts(prompt, negative, recipe)
    encoders = _encoders(base, llama, _max_sequence_length(data, case))
    texts = list(dict.fromkeys(edit_rows + refine_rows))
    encoded = encoders.encode(texts)
    del encoders

    def batch(rows):
        e = PromptEmbedding.concatenate([encoded.row(texts.index(t)) for t in rows])
        return Conditioning(e.t5_embeds, e.llama_hidden_states, e.pooled_embeds)

    cond = EditConditioning(batch(edit_rows), batch(refine_rows))
    vae = load_vae(base / "vae", mx.float32, lazy=False)
    pixels = preprocess_uint8(np.asarray(data["pipeline_image"]))
    image_latents = vae.to_model_space(vae.encode_moments(mx.array(pixels))[0])
    init = mx.array(TorchRandn(int(data["seed"].item())).randn(tuple(image_latents.shape)))
    if unaliased:
        model, _ = load_transformer_planned(base / "transformer", mx.float32, lazy=False)
    else:
        model = edit_transformer(source)
    max_seq = int(data["max_seq"].item())
    steps: list = []
    final = sample_edit(model, cond, image_latents, init, recipe, schedule, max_seq,
                        _stage_hook(model, source, unaliased), steps.append)
    del model
    edit = [np.array(s.output) for s in steps if s.stage == EDIT]
    refine = [np.array(s.output) for s in steps if s.stage == REFINE]
    latents = np.stack([np.array(s.latent) for s in steps])
    start = recipe.refine_start
    out = {"timesteps": schedule.timesteps, "model_timesteps": schedule.timesteps,
           "sigmas": np.asarray(schedule.sigmas, np.float32),
           "refine_start_step": np.array(start if start < recipe.steps else -1, np.int64),
           "max_seq": np.array(max_seq, np.int64), "pipeline_image": np.asarray(data["pipeline_image"]),
           "preprocessed_image": pixels, "image_latents": np.array(image_latents), "init_latents": np.array(init),
           "guided": np.stack([np.array(s.guided) for s in steps]), "latents": latents,
           "final_latents": np.array(final)}
    rows = image_rows(image_latents, recipe.uses_cfg)
    if edit:
        out["edit.model_input_step0"] = np.array(edit_model_input(init, rows, rows.shape[0]))
        out["edit.model_output_left"] = np.stack(edit)
    if refine:
        before = init if start == 0 else mx.array(latents[start - 1])
        out["refine.model_input_step0"] = np.array(mx.concatenate([before] * (2 if recipe.uses_cfg else 1), axis=0))
        out["refine.model_output"] = np.stack(refine)
    out.update(decode_outputs(vae, final))
    out.update({k: np.asarray(data[k]) for k in data.files if k not in out and data[k].ndim == 0})  # the settings
    return out


REPLAYERS: dict[str, Callable] = {
    "edit_encoding": replay_edit_encoding,
    "image_latents": replay_image_latents,
    "edit_forward": replay_edit_forward,
    "sampling": replay_sampling,
}
NEEDS_MODEL = ("edit_forward", "sampling")


def replay_e1(model: str, case: Path, base: Optional[str] = None, llama: Optional[str] = None,
              allow_download: bool = True) -> dict[str, np.ndarray]:
    """What ``hidream-mlx replay`` runs for an E1 case: ``model`` is an E1 model (on ``base``,
    default HiDream-I1-Full) or the base pipeline itself, which is enough for the cases that need
    no E1 weights (``edit_encoding``, ``image_latents``)."""
    if e1_model_kind(model) is not None:
        source = E1Source.resolve(model, base, llama=llama, allow_download=allow_download)
        return replay_e1_case(case, source.path, source, source.llama.folder)
    if base is not None:
        raise ReplayError(f"--base {base}: --model {model} is not an E1 model but a pipeline, which is the base "
                          "itself; give the E1 model as --model and the pipeline as --base")
    pipeline = resolve_base(str(model), E1_1, allow_download)
    return replay_e1_case(case, pipeline, None, resolve_llama(pipeline, llama, allow_download).folder)


def replay_e1_case(case: Path, base: Path, source: Optional[E1Source] = None,
                   llama: Optional[Path] = None) -> dict[str, np.ndarray]:
    """Replay one E1 case file: ``base`` the I1 pipeline folder, ``source`` the E1 model on it
    (needed by ``edit_forward`` and ``sampling`` cases), ``llama`` a separate Llama folder."""
    case, base = Path(case), Path(base)
    with open_case(case) as data:
        kind = e1_case_kind(data.files)
        if kind is None:
            raise ReplayError(f"{case}: not a HiDream-E1 case (expected the keys of edit_encoding, image_latents, "
                              "edit_forward or e1_*_sampling)")
        return REPLAYERS[kind](data, case, base, None if llama is None else Path(llama), source)
