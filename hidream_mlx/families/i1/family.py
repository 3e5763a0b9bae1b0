"""HiDream-I1 as the application sees it: :class:`I1Family` implements :class:`hidream_mlx.family.Family`.

I1 is a diffusers pipeline: four text encoders (``clip``, ``t5``, ``llama``, ``text_encoding``), a
sparse-MoE ``transformer`` over FLUX-VAE latents (``vae``), and the official samplers (``sampling``).
``source`` finds the pipeline and its Llama, ``requests`` checks what a user asks, ``engine`` runs the
phases (prompts, transformer, decode) one at a time, ``memory``/``info`` predict each phase's peak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.family import Family, RequestError
from hidream_mlx.images import FLAG, NUMBER, TEXT, WHOLE, one_of, optional
from hidream_mlx.memory import parameter_bytes
from hidream_mlx.families.i1.bench import I1BenchConfig, report_lines_i1, run_bench_i1
from hidream_mlx.families.i1.convert import convert_i1
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
