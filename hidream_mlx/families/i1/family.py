"""HiDream-I1 and HiDream-E1 as the application sees them: :class:`I1Family` and :class:`E1Family`
implement :class:`hidream_mlx.family.Family`.

I1 is a diffusers pipeline: four text encoders (``clip``, ``t5``, ``llama``, ``text_encoding``), a
sparse-MoE ``transformer`` over FLUX-VAE latents (``vae``), and the official samplers (``sampling``).
``source`` finds the pipeline and its Llama, ``requests`` checks what a user asks, ``engine`` runs the
phases (prompts, transformer, decode) one at a time, ``memory``/``info`` predict each phase's peak.

E1 edits a source image (``--ref``) following an instruction, on the I1 transformer: E1.1 brings
its own transformer, E1-Full a LoRA checkpoint for I1-Full's; the base (``--base``, a HiDream-I1-Full
pipeline) gives the encoders, the VAE and the scheduler. Its package is ``e1/``: ``source`` finds both,
``requests`` checks what a user asks, ``engine`` runs the phases (``sampling``: the editing sampler),
``memory``/``info`` predict them, ``metadata`` is what an image records, ``replay`` replays the
golden cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.family import Family, RequestError
from hidream_mlx.images import FLAG, NUMBER, TEXT, WHOLE, ListOf, one_of, optional
from hidream_mlx.memory import parameter_bytes
from hidream_mlx.families.i1.bench import I1BenchConfig, report_lines_i1, run_bench_i1
from hidream_mlx.families.i1.convert import convert_i1
from hidream_mlx.families.i1.e1.engine import E1Engine, load_edit_transformer, request_texts
from hidream_mlx.families.i1.e1.info import e1_info_lines
from hidream_mlx.families.i1.e1.memory import check_fits_e1, edit_phase_peaks
from hidream_mlx.families.i1.e1.metadata import describe_edit_image, recorded_edit_settings
from hidream_mlx.families.i1.e1.recipes import E1_RECIPES, FAMILY as E1
from hidream_mlx.families.i1.e1.replay import e1_case_kind, replay_e1
from hidream_mlx.families.i1.e1.requests import NOISE_KINDS as E1_NOISE_KINDS, build_e1_request
from hidream_mlx.families.i1.e1.source import E1Source, e1_model_kind
from hidream_mlx.families.i1.encoder_common import ENCODER_BITS
from hidream_mlx.families.i1.engine import I1Engine, check_load_options
from hidream_mlx.families.i1.lora_targets import check_loras
from hidream_mlx.families.i1.info import describe_i1_image, i1_info_lines, recorded_i1_settings
from hidream_mlx.families.i1.memory import check_fits_i1
from hidream_mlx.families.i1.recipes import FAMILY, I1_RECIPES
from hidream_mlx.families.i1.replay import i1_case_kind, replay_i1_case
from hidream_mlx.families.i1.requests import build_i1_request
from hidream_mlx.families.i1.source import I1Source, is_i1_pipeline
from hidream_mlx.families.i1.synthetic import I1_DIMS
from hidream_mlx.families.i1.text_encoding import DEFAULT_MAX_SEQUENCE_LENGTH
from hidream_mlx.families.i1.weights import load_transformer_planned, load_vae
from hidream_mlx.weights.precision import parse_dtype

# Quantize options that only a HiDream-O1 checkpoint reads.
O1_CONVERT_FLAGS = {"no_vision": "--no-vision", "quantize_embeddings": "--quantize-embeddings",
                    "report": "--report", "loras": "--lora", "tokenizer": "--tokenizer"}


def encoder_bits(load: dict) -> Optional[int]:
    bits = load.get("encoder_bits")
    return int(bits) if bits else None


class I1Family(Family):
    name = FAMILY
    title = "HiDream-I1"
    prompt_rule = (f"HiDream-I1's encoders read the first {DEFAULT_MAX_SEQUENCE_LENGTH} of their tokens (the rest "
                   "dropped, with a note)")
    recipes = tuple(I1_RECIPES)
    load_options = ("llama", "encoder_bits", "keep_loaded")
    option_choices = {"encoder_bits": ENCODER_BITS}
    random_dims = tuple(I1_DIMS)
    metadata_fields = {"recipe": one_of(*I1_RECIPES), "step_noise_seed": WHOLE, "shift": optional(NUMBER),
                       "mu_shift": FLAG, "llama": optional(TEXT), "encoder_bits": optional(one_of(*ENCODER_BITS))}

    def recognises(self, arg: str) -> bool:
        return is_i1_pipeline(arg)

    def resolve(self, arg, options: Optional[dict] = None, allow_download: bool = True) -> I1Source:
        llama = (options or {}).get("llama")
        return I1Source.resolve(arg, llama=None if llama is None else str(llama), allow_download=allow_download)

    def build_request(self, model, options: dict, note):
        return build_i1_request(model, options, note)

    def check_load(self, source, load: dict) -> None:
        check_load_options(load["dtype"])
        check_loras(source, load.get("loras", ()))  # each read against the transformer's layers, before loading

    def check_fits(self, source, requests: list, load: dict, extra_bytes: int = 0) -> None:
        dtype_bytes = parse_dtype(load["dtype"]).size
        for w, h, cfg in sorted({(r.width, r.height, r.recipe.uses_cfg) for r in requests}):
            check_fits_i1(source, dtype_bytes, load.get("bits"), encoder_bits(load), w, h, cfg,
                          images=len(requests), extra_bytes=extra_bytes)

    def load_engine(self, source, load: dict) -> I1Engine:
        """An engine whose weights load phase by phase when it runs (the LoRA files are checked now)."""
        check_load_options(load["dtype"])
        engine = I1Engine(source, load["dtype"], load.get("bits"), encoder_bits(load), load.get("loras", ()))
        engine.keep_loaded = bool(load.get("keep_loaded"))
        return engine

    def bench(self, options: dict, log) -> list[str]:
        o1_only = {"--dims real": options["dims"] == "real", "--layers": options.get("layers") is not None,
                   "--compare-naive": options.get("compare_naive"), "--compare-cfg": options.get("compare_cfg"),
                   "--prompt-tokens": options.get("prompt_tokens") is not None}
        given = [name for name, on in o1_only.items() if on]
        if given:
            raise RequestError(f"{given[0]} is for the O1 bench, not --family i1")
        config = I1BenchConfig(dims=options["dims"], quantize=options.get("bits"),
                               size=options.get("size") or I1BenchConfig.size, steps=options["steps"],
                               guidance=options["guidance"], repeats=options["repeats"], dtype=options["dtype"])
        return report_lines_i1(run_bench_i1(config, log=log))

    def resident_weights(self, source, load: dict) -> tuple[int, Optional[dict]]:
        """The transformer (``-q`` quantizes it as it streams in) and the VAE: what stays resident
        while sampling; the text encoders run once per prompt before it and are not counted."""
        dtype = parse_dtype(load["dtype"])
        transformer, plan = load_transformer_planned(source.path / "transformer", dtype, lazy=False,
                                                     bits=load.get("bits"))
        vae = load_vae(source.path / "vae", dtype, lazy=False)
        mx.eval(transformer.parameters(), vae.parameters())
        return parameter_bytes(transformer) + parameter_bytes(vae), plan.description if plan is not None else None

    def info_lines(self, arg, options: dict, note) -> list[str]:
        if options.get("bits"):
            raise RequestError("-q applies to HiDream-O1; for a HiDream-I1 pipeline info shows bf16, Q8 and Q4")
        if options.get("dims") is not None:
            raise RequestError("--random-weights describes HiDream-O1 models; give --model or --random-weights")
        dtype = options["dtype"]
        return i1_info_lines(arg, options.get("llama"), dtype, parse_dtype(dtype).size, options.get("width"),
                             options.get("height"), options.get("guidance"), bool(options.get("no_snap")))

    def recorded_settings(self, meta: dict) -> dict:
        return recorded_i1_settings(meta)

    def describe_image(self, meta: dict) -> list[str]:
        return describe_i1_image(meta)

    def convert(self, arg, output, recipe, options: dict, on_notice, on_progress):
        refused = [flag for key, flag in O1_CONVERT_FLAGS.items() if options.get(key)]
        if refused:
            raise ValueError(f"{refused[0]}: not available for HiDream-I1 pipelines (O1 only)")
        return convert_i1(arg, output, recipe, bits=options.get("bits"), group_size=options.get("group_size"),
                          overwrite=options.get("overwrite", False), on_notice=on_notice, on_progress=on_progress)

    def case_format(self, case) -> Optional[str]:
        return i1_case_kind(case.files)

    def replay(self, arg, case_path, options: dict) -> dict[str, np.ndarray]:
        source = self.resolve(arg, options)
        return replay_i1_case(source.path, Path(case_path), source.llama.folder)


class E1Family(Family):
    name = E1
    title = "HiDream-E1"
    recipes = tuple(E1_RECIPES)
    own_options = {
        "image_guidance": (None, "it weighs the source image in an edit's guidance"),
        "refine_strength": (None, "it sets the share of an edit's steps that refine without the source"),
        "no_clip_cfg_norm": (False, "it turns off an edit's guidance norm clip"),
        "keep_source_size": (False, "it resizes an edit back to its source's size"),
        # read by O1 too: listed so the shared builder leaves them to this family
        "refs": ((), "the source image an edit changes"),
        "noise": ("torch", "it picks an edit's noise generator"),
    }
    load_options = ("llama", "encoder_bits", "keep_loaded", "base")
    metadata_fields = {
        "recipe": one_of(*E1_RECIPES), "noise": one_of(*E1_NOISE_KINDS), "e1_model": one_of(*E1_RECIPES),
        "image_guidance": NUMBER, "refine_strength": NUMBER, "clip_cfg_norm": FLAG, "target_prompt": TEXT,
        "edited_size": ListOf(WHOLE), "source_size": ListOf(WHOLE), "max_seq": WHOLE,
        # the base and a separate Llama by name (a repo id, or a folder's name: never a path)
        "base": TEXT, "base_fingerprint": TEXT, "llama": optional(TEXT),
        "encoder_bits": optional(one_of(*ENCODER_BITS)),
    }
    # Other families whose models replay some of its cases: the base pipeline alone replays the
    # cases that need no E1 weights (prompt encodings, the source's latents).
    replay_models = ("i1",)

    def recognises(self, arg: str) -> bool:
        return e1_model_kind(arg) is not None

    def resolve(self, arg, options: Optional[dict] = None, allow_download: bool = True) -> E1Source:
        options = options or {}
        llama, base = options.get("llama"), options.get("base")
        return E1Source.resolve(arg, None if base is None else str(base), llama=None if llama is None else str(llama),
                                allow_download=allow_download)

    def build_request(self, model, options: dict, note):
        if model is None:
            raise RequestError("a HiDream-E1 edit needs its model (random weights are HiDream-O1's)")
        return build_e1_request(model, options, note)

    def check_load(self, source, load: dict) -> None:
        check_load_options(load["dtype"])
        check_loras(source, load.get("loras", ()))

    def check_fits(self, source, requests: list, load: dict, extra_bytes: int = 0) -> None:
        dtype_bytes = parse_dtype(load["dtype"]).size
        texts = max((len(request_texts(r)) for r in requests), default=2)
        for w, h, edited, recipe in sorted({(r.width, r.height, r.edited_size, r.recipe) for r in requests},
                                           key=lambda k: (k[0], k[1], k[2], k[3].name)):
            check_fits_e1(edit_phase_peaks(source, recipe, w, h, edited, load.get("bits"), encoder_bits(load),
                                           dtype_bytes, texts=texts, images=len(requests), extra_bytes=extra_bytes))

    def load_engine(self, source, load: dict) -> E1Engine:
        """An engine whose weights load phase by phase when it runs (the LoRA files are checked now)."""
        check_load_options(load["dtype"])
        engine = E1Engine(source, load["dtype"], load.get("bits"), encoder_bits(load), load.get("loras", ()))
        engine.keep_loaded = bool(load.get("keep_loaded"))
        return engine

    def resident_weights(self, source, load: dict) -> tuple[int, Optional[dict]]:
        """The edit transformer (``-q`` quantizes it as it streams in; E1-Full with its LoRA side
        paths) and the VAE: what stays resident while sampling."""
        dtype = parse_dtype(load["dtype"])
        transformer, plan = load_edit_transformer(source, dtype, load.get("bits"))
        vae = load_vae(source.path / "vae", dtype, lazy=False)
        mx.eval(transformer.parameters(), vae.parameters())
        return parameter_bytes(transformer) + parameter_bytes(vae), plan.description if plan is not None else None

    def info_lines(self, arg, options: dict, note) -> list[str]:
        if options.get("bits"):
            raise RequestError("-q: for a HiDream-E1 model info shows bf16, Q8 and Q4")
        if options.get("dims") is not None:
            raise RequestError("--random-weights describes HiDream-O1 models; give --model or --random-weights")
        if options.get("no_snap"):
            raise RequestError("--no-snap: HiDream-E1 sizes follow the model's resize rule (E1.1 a pixel budget, "
                               "E1-Full an exact size)")
        dtype = options["dtype"]
        return e1_info_lines(arg, options.get("base"), options.get("llama"), dtype, parse_dtype(dtype).size,
                             options.get("width"), options.get("height"), options.get("guidance"))

    def recorded_settings(self, meta: dict) -> dict:
        return recorded_edit_settings(meta)

    def describe_image(self, meta: dict) -> list[str]:
        return describe_edit_image(meta)

    def case_format(self, case) -> Optional[str]:
        return e1_case_kind(case.files)

    def replay(self, arg, case_path, options: dict) -> dict[str, np.ndarray]:
        """``arg``: an E1 model (on ``options["base"]``) or the base pipeline itself."""
        return replay_e1(str(arg), Path(case_path), options.get("base"), options.get("llama"))
