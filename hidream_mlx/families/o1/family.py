"""HiDream-O1 as the application sees it: :class:`O1Family` implements :class:`hidream_mlx.family.Family`.

O1 is one Qwen3-VL transformer that predicts 32 px pixel patches (no VAE): ``source`` finds a
checkpoint, ``requests`` checks what a user asks, ``engine`` loads the model and runs ``sampling``,
``memory``/``info`` predict what a request needs, ``convert`` and ``replay`` are the tools.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from hidream_mlx.family import RANGES, Family, RequestError
from hidream_mlx.files import atomic_output
from hidream_mlx.images import FLAG, NUMBER, WHOLE, Record, Scalar, one_of, optional
from hidream_mlx.memory import parameter_bytes
from hidream_mlx.noise import NOISE_KINDS
from hidream_mlx.families.o1.bench import BenchConfig, report_lines, run_bench
from hidream_mlx.families.o1.convert import convert, source_matrices
from hidream_mlx.families.o1.engine import Engine
from hidream_mlx.families.o1.fidelity import comparison_plans, fidelity_report
from hidream_mlx.families.o1.info import describe_o1_image, o1_info_lines, recorded_o1_settings
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.families.o1.lora_targets import check_loras
from hidream_mlx.families.o1.memory import check_fits_folder
from hidream_mlx.families.o1.prompt import MAX_PROMPT_TOKENS
from hidream_mlx.families.o1.recipes import RECIPES
from hidream_mlx.families.o1.replay import detect_format, replay_case
from hidream_mlx.families.o1.seam_smoothing import WINDOWS
from hidream_mlx.families.o1.requests import USED_BY, build_o1_request
from hidream_mlx.families.o1.source import SINGLE_FILE, ModelSource
from hidream_mlx.families.o1.synthetic import TEXT_DIMS, random_model
from hidream_mlx.quant.output import REPORT_FILE
from hidream_mlx.quant.quantization import quantize_in_memory
from hidream_mlx.weights.loading import is_vision, module_name
from hidream_mlx.weights.precision import check_with_quantization, parse_dtype

# Quantize options only an O1 checkpoint reads.
O1_CONVERT_OPTIONS = ("no_vision", "quantize_embeddings", "report", "loras", "tokenizer")


def within(option: str) -> Scalar:
    """A recorded number in ``option``'s range (as the option's own check says it)."""
    valid = RANGES[option]
    return Scalar(f"a number {valid.text()}", lambda v: NUMBER.test(v) and valid.contains(v))


def has_vision_tower(source: ModelSource) -> bool:
    return any(is_vision(module_name(name)) for name in source.index)


class O1Family(Family):
    name = "o1"
    title = "HiDream-O1"
    prompt_rule = f"HiDream-O1 at most {MAX_PROMPT_TOKENS:,} of its tokens"
    recipes = tuple(RECIPES)
    own_options = {
        "refs": ((), "reference images for editing and subject-driven generation"),
        "layout": (None, "it places --ref images"),
        "keep_aspect": (False, "it keeps a --ref image's aspect"),
        "editing_scheduler": ("flow_match", "it picks the O1 editing sampler"),
        "noise": ("torch", "the other families draw their noise as torch does, so --seed matches their "
                           "reference pipelines"),
        "noise_scale": (None, "the other families' samplers have no such setting"),
        "s_noise": (None, "the other families' samplers have no such setting"),
        "noise_clip": (None, "the other families' samplers have no such setting"),
        "blend_seams": (0, "it softens O1's 32 px patch grid"),
        "seam_smoothing": (0.0, "it smooths O1's 32 px patch grid"),
        "seam_window": ("hann", "it belongs to --seam-smoothing"),
        "seam_strength": (1.0, "it belongs to --seam-smoothing"),
    }
    recipe_options = USED_BY
    option_choices = {"noise": NOISE_KINDS, "seam_window": WINDOWS}
    random_dims = tuple(TEXT_DIMS)
    metadata_fields = {
        "recipe": one_of(*RECIPES), "noise": one_of(*NOISE_KINDS), "blend_seams": WHOLE, "keep_aspect": FLAG,
        # The boxes themselves, as JSON text (never a file name a re-run would read).
        "layout": optional(Scalar("JSON boxes as text", lambda v: isinstance(v, str) and v.strip()[:1] in ("[", "{"))),
        "keep_aspect_budget": WHOLE, "seam_passes": WHOLE,
        "seam_smoothing": Record({"fraction": within("seam_smoothing"), "window": one_of(*WINDOWS),
                                  "strength": within("seam_strength")}, required=("fraction", "window", "strength")),
    }

    def recognises(self, arg: str) -> bool:
        return True  # the registry's fallback: asked last

    def resolve(self, arg, options: Optional[dict] = None, allow_download: bool = True) -> ModelSource:
        tokenizer = (options or {}).get("tokenizer")
        return ModelSource.resolve(arg, tokenizer=None if tokenizer is None else str(tokenizer),
                                   allow_download=allow_download)

    def build_request(self, model, options: dict, note):
        request = build_o1_request(model, options, note)
        if request.references and isinstance(model, ModelSource) and not has_vision_tower(model):
            raise RequestError(f"{model.path}: this model has no vision tower (converted with --no-vision), so --ref "
                               "cannot be used; convert again without --no-vision or use the original checkpoint")
        return request

    def check_load(self, source, load: dict) -> None:
        check_with_quantization(load["dtype"], load.get("bits") or source.quantization)
        # Every LoRA read against the model's layer shapes now: one that does not fit fails before loading.
        check_loras(source, load.get("loras", ()))

    def check_fits(self, source, requests: list, load: dict, extra_bytes: int = 0) -> None:
        dtype_bytes = parse_dtype(load["dtype"]).size
        text_tokens = max((r.text_tokens for r in requests), default=0)  # the longest prompt counts too
        for w, h, cfg in sorted({(r.width, r.height, r.recipe.uses_cfg) for r in requests}):
            check_fits_folder(source, dtype_bytes, load.get("bits"), w, h, cfg, extra_bytes=extra_bytes,
                              text_tokens=text_tokens)

    def load_engine(self, source, load: dict) -> Engine:
        return Engine.load(source, dtype=load["dtype"], quantize_bits=load.get("bits"), loras=load.get("loras", ()))

    def random_engine(self, dims: str, layers: Optional[int], dtype: str, bits: Optional[int]) -> Engine:
        start = time.perf_counter()
        net = random_model(dims, layers, dtype=parse_dtype(dtype))
        quantization = None
        if bits:
            quantization = quantize_in_memory(net, bits)
            mx.eval(net.parameters())
        return Engine(net, name=f"random-{dims}", quantization=quantization, dtype=dtype,
                      load_time=time.perf_counter() - start)

    def bench(self, options: dict, log) -> list[str]:
        if options["dims"] not in self.random_dims:
            raise RequestError(f"--dims {options['dims']}: HiDream-O1's are {', '.join(self.random_dims)}")
        config = BenchConfig(dims=options["dims"], layers=options.get("layers"), quantize=options.get("bits"),
                             size=options.get("size") or BenchConfig.size, steps=options["steps"],
                             guidance=options["guidance"], prompt_tokens=options.get("prompt_tokens") or
                             BenchConfig.prompt_tokens, repeats=options["repeats"],
                             dtype=options["dtype"], compare_naive=options.get("compare_naive", False),
                             compare_cfg=options.get("compare_cfg", False))
        return report_lines(run_bench(config, log=log))

    def resident_weights(self, source, load: dict) -> tuple[int, Optional[dict]]:
        engine = self.load_engine(source, load)
        mx.eval(engine.model.parameters())
        return parameter_bytes(engine.model), engine.quantization

    def info_lines(self, arg, options: dict, note) -> list[str]:
        for name in ("llama", "no_snap"):
            if options.get(name):
                raise RequestError(f"--{name.replace('_', '-')} applies to HiDream-I1 pipelines only "
                                   "(O1 sizes are taken as given)")
        return o1_info_lines(arg, options.get("dims"), options.get("layers"), options.get("bits"), options["dtype"],
                             parse_dtype(options["dtype"]).size, options.get("width"), options.get("height"),
                             options.get("guidance"), options.get("text_tokens", 128), note=note)

    def recorded_settings(self, meta: dict) -> dict:
        return recorded_o1_settings(meta)

    def describe_image(self, meta: dict) -> list[str]:
        return describe_o1_image(meta)

    def convert(self, arg, output, recipe, options: dict, on_notice, on_progress):
        source = self.resolve(arg, options)
        if options.get("report") and source.layout == SINGLE_FILE:
            raise ValueError("--report: needs a model folder (a single-file checkpoint has no config.json to rebuild "
                             "the float model from); convert first, or pass the official folder")
        for line in source.notes:
            on_notice(line.removeprefix("note: "))
        conversion = convert(source, output, recipe, bits=options.get("bits"), group_size=options.get("group_size"),
                             include_vision=not options.get("no_vision"), overwrite=options.get("overwrite", False),
                             on_notice=on_notice, on_progress=on_progress, loras=options.get("loras", ()))
        if options.get("report"):
            layers = conversion.config["text_config"]["num_hidden_layers"]
            others = comparison_plans(conversion.plan, source_matrices(source.index), layers)
            conversion.report = fidelity_report(source.path, conversion.plan, recipe.name,
                                                dtype=parse_dtype(options.get("report_dtype", "bfloat16")),
                                                others=others)
            with atomic_output(Path(output) / REPORT_FILE, overwrite=True) as tmp:
                tmp.write_text(conversion.report.markdown())
        return conversion

    def case_format(self, case) -> Optional[str]:
        try:
            return detect_format(case)
        except ValueError:
            return None

    def replay(self, arg, case_path, options: dict) -> dict[str, np.ndarray]:
        model_dir = self.resolve(arg).path
        return replay_case(load_model(model_dir, dtype=mx.float32), case_path, model_dir)
