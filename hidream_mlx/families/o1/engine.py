"""One image from a request: load once, encode the prompt, sample, and report what ran.

This is the library face of ``hidream-mlx generate`` and of the eval harness: ``Engine`` holds
a loaded model; ``Engine.run`` evaluates and times every step (``on_step`` is where a progress
bar or a preview writer hooks in) and returns the image with its reproducibility metadata.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from hidream_mlx import __version__
from hidream_mlx.family import NonFiniteLatentError, Result, StartImage
from hidream_mlx.files import file_record
from hidream_mlx.families.o1.loading import load_model_planned
from hidream_mlx.weights.precision import apply_precision, check_with_quantization, parse_dtype
from hidream_mlx.memory import parameter_bytes, wired_limit
from hidream_mlx.noise import make_noise_source
from hidream_mlx.families.o1.patches import patches_to_image
from hidream_mlx.families.o1.sampling import (
    Conditioning,
    Start,
    Step,
    encode,
    encode_synthetic,
    encode_with_references,
    initial_noise,
    mask_patches,
    sample,
    source_patches,
)
from hidream_mlx.families.o1.source import SINGLE_FILE, ModelSource
from hidream_mlx.families.o1.prompt import UNCOND_PROMPT, Tokenizer, load_tokenizer
from hidream_mlx.families.o1.recipes import Recipe, get_recipe, recipe_for_model
from hidream_mlx.families.o1.seam_smoothing import SeamSmoothing, extra_passes
from hidream_mlx.families.o1.seams import blend_seams
from hidream_mlx.families.o1.transformer import HiDreamO1
from hidream_mlx.families.o1.references import ImageProcessorConfig, prepare_references
from hidream_mlx.weights.lora import apply_loras, linear_targets, read_lora
from hidream_mlx.weights.source import model_identity, recorded_name
from hidream_mlx.families.o1.vision import load_vision_tower

FAMILY = "o1"


@dataclass(frozen=True)
class Request:
    prompt: str
    width: int
    height: int
    seed: int
    recipe: Recipe
    noise: str = "torch"
    blend_seams: int = 0
    size_note: str = ""
    references: tuple[str, ...] = ()  # image paths for editing / subject-driven generation
    layout: Optional[str] = None  # layout boxes (JSON text) placing the references
    keep_aspect: bool = False  # one reference: the output takes its aspect ratio
    keep_aspect_budget: int = 2048  # with keep_aspect: the side of the square pixel area it is fitted into
    seam_smoothing: float = 0.0  # fraction of the final steps with the half-patch-shifted pass
    seam_window: str = "hann"
    seam_strength: float = 1.0
    negative_prompt: Optional[str] = None  # replaces the unconditional prompt " " (CFG recipes only)
    # Tokens of the longest text prefix (prompt or negative, chat template included) for the
    # memory fit check; 0 when not counted. Not a setting: left out of equality and metadata.
    text_tokens: int = field(default=0, compare=False)
    start: Optional[StartImage] = None  # image-to-image / inpainting: the picture the run starts from
    family: ClassVar[str] = FAMILY

    @property
    def run_steps(self) -> int:
        """The steps that run: all of the recipe's, or the last ``int(steps * strength)`` from an image."""
        return self.recipe.steps if self.start is None else self.start.run_steps(self.recipe.steps)

    @property
    def seams(self) -> SeamSmoothing:
        return SeamSmoothing(self.seam_smoothing, self.seam_window, self.seam_strength)

    @property
    def seam_passes(self) -> int:
        """Extra transformer passes per image that seam smoothing costs."""
        return extra_passes(self.seams, self.recipe.steps, self.recipe.uses_cfg)

    def metadata(self) -> dict:
        return {
            "family": FAMILY,
            "prompt": self.prompt,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "recipe": self.recipe.name,
            "official_recipe": self.recipe.official,
            "steps": self.recipe.steps,
            "guidance": self.recipe.guidance,
            "recipe_settings": self.recipe.settings(),
            "noise": self.noise,
            "blend_seams": self.blend_seams,
            "references": [Path(r).name for r in self.references],  # names only (never a folder); sha256 below
            "reference_files": [file_record(r) for r in self.references],
            "layout": self.layout,
            "keep_aspect": self.keep_aspect,
            **({"keep_aspect_budget": self.keep_aspect_budget} if self.keep_aspect else {}),
            **({"seam_smoothing": self.seams.describe(), "seam_passes": self.seam_passes}
               if self.seams.enabled else {}),
            **({"negative_prompt": self.negative_prompt} if self.negative_prompt is not None else {}),
            **(self.start.metadata(self.recipe.steps) if self.start is not None else {}),
        }


class Engine:
    """A loaded model with its tokenizer and what it says about itself.

    ``Engine.load`` reads a folder or repo id; ``Engine(model)`` wraps a model built in memory
    (random weights for benchmarks), in which case prompts become synthetic token ids.
    """

    family = FAMILY

    def __init__(self, model: HiDreamO1, tokenizer: Optional[Tokenizer] = None, name: str = "in-memory",
                 stored: Optional[dict] = None, quantization: Optional[dict] = None, dtype: str = "float32",
                 load_time: float = 0.0, path: Optional[Path] = None, source: Optional[ModelSource] = None):
        self.model = model
        self.path = path
        self.source = source
        self._vision = None
        # One-shot runs drop the vision tower once the references are encoded; batteries keep it.
        self.keep_vision = True
        self.tokenizer = tokenizer
        self.model_arg = name
        self.stored = stored or {}
        self.quantization = quantization
        self.dtype = dtype
        self.load_time = load_time
        self.loras: list = []  # LoRASummary per applied LoRA, recorded in every image's metadata
        self.default_recipe = recipe_for_model(source.name if source is not None else name, self.stored)
        # Batches set a dict here: text-to-image Conditioning reused across seeds of a prompt and size.
        self.conditioning_cache: Optional[dict] = None

    @classmethod
    def load(cls, model, dtype: str = "bfloat16", quantize_bits: Optional[int] = None,
             lazy: bool = False, loras: Sequence = ()) -> "Engine":
        """Load the transformer of ``model`` (a :class:`ModelSource`, or what resolves to one),
        then apply ``loras`` (:class:`~hidream_mlx.weights.lora.LoRASpec`, in order)."""
        start = time.perf_counter()
        source = ModelSource.resolve(model)
        check_with_quantization(dtype, quantize_bits or source.quantization)
        if source.layout == SINGLE_FILE:
            engine = cls._load_single_file(source, dtype, quantize_bits, lazy, start).with_loras(loras)
        else:
            path, config = source.path, source.config
            model, plan = load_model_planned(path, dtype=parse_dtype(dtype), lazy=lazy, bits=quantize_bits,
                                             config=config, index=source.index)
            quantization = plan.description if plan is not None else None
            engine = cls(model, load_tokenizer(source.tokenizer_dir or path), source.arg, config.hidream, quantization,
                         dtype, time.perf_counter() - start, path, source).with_loras(loras)
        # After the LoRAs: they merge into the float32 weights that mixed precision keeps.
        apply_precision(engine.model, dtype)
        return engine

    def with_loras(self, specs: Sequence) -> "Engine":
        """Apply LoRAs (merged into float layers, side paths on quantized ones); summaries stack in ``loras``."""
        self.loras = self.loras + apply_loras(self.model, specs)
        return self

    @classmethod
    def _load_single_file(cls, source: ModelSource, dtype: str, quantize_bits: Optional[int], lazy: bool,
                          start: float) -> "Engine":
        """A single-file release: the config and index come from the source (there is no config.json);
        ``-q`` quantizes its decoder linears as they are read, as for a folder."""
        model, plan = load_model_planned(source.path, dtype=parse_dtype(dtype), lazy=lazy, bits=quantize_bits,
                                         config=source.config, index=source.index)
        quantization = plan.description if plan is not None else None
        return cls(model, load_tokenizer(source.tokenizer_dir), source.arg, source.stored, quantization, dtype,
                   time.perf_counter() - start, source.path, source)

    @property
    def vision(self):
        """The vision tower, loaded on first use: text-to-image never needs it."""
        if self._vision is None:
            if self.path is None:
                raise ValueError("reference images need a model folder with a vision tower")
            self._vision = load_vision_tower(self.path, self.model.config, parse_dtype(self.dtype))
        return self._vision

    def prepare_references(self, request: Request):
        """Reference inputs for ``request`` (None for text-to-image) and the request at the size
        that will run (``keep_aspect`` takes the reference's)."""
        if not request.references:
            return None, request

        if self.path is None or self.tokenizer is None:
            raise ValueError("reference images need a model folder with a tokenizer and a vision tower")
        side_files = self.source.tokenizer_dir if self.source is not None and self.source.tokenizer_dir else self.path
        processor = ImageProcessorConfig.from_file(side_files / "preprocessor_config.json")
        refs = prepare_references(list(request.references), request.height, request.width, processor,
                                  layout_boxes=request.layout, keep_original_aspect=request.keep_aspect,
                                  keep_aspect_size=request.keep_aspect_budget)
        if (refs.width, refs.height) != (request.width, request.height):
            request = dataclasses.replace(request, width=refs.width, height=refs.height,
                                          size_note=f"{refs.width}x{refs.height} (the reference's aspect)")
        return refs, request

    def describe(self) -> dict:
        return {
            "model": self.model_arg,  # in-memory models; a loaded one records its name (model_identity)
            **({"converted_from": recorded_name(self.stored["source"])} if self.stored.get("source") else {}),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "tool_version": __version__,
            **({"loras": [s.to_dict() for s in self.loras]} if self.loras else {}),
            **(model_identity(self.source) if self.source is not None else {}),
        }

    def recipe(self, name: Optional[str] = None) -> Recipe:
        return get_recipe(name or self.default_recipe)

    # --- what the application drives (hidream_mlx.family.Family's engine protocol) ---

    def prepare(self, requests: Sequence[Request], note: Callable[[str], None]) -> None:
        """Before the first image: the weights are loaded already; a batch with references keeps
        the vision tower between images (a single image frees it once the references are encoded)."""
        self.keep_vision = len(requests) > 1 and any(r.references for r in requests)
        for lora in self.loras:
            note(lora.line())
        note(f"model loaded once in {self.load_time:.1f} s"
             f"{f' for {len(requests)} images' if len(requests) > 1 else ''}")

    def announce(self, request: Request) -> list[str]:
        rec = request.recipe
        lines = [f"size {request.size_note}; recipe {rec.name}, {rec.steps} steps, guidance {rec.guidance:g}, "
                 f"seed {request.seed}"]
        if not rec.official:
            subset = f" ({rec.steps} of the 28 distilled timesteps)" if rec.distilled and rec.steps < 28 else ""
            lines.append(f"note: settings differ from the released {rec.name} recipe{subset}")
        return lines

    def check_loras(self, specs: Sequence) -> None:
        """Read each LoRA against the model now (LoRAError naming the file), so one that does not fit
        is refused before a job is queued."""
        targets = linear_targets(self.model)
        for spec in specs:
            read_lora(spec.path, targets)

    def resident_bytes(self) -> int:
        return parameter_bytes(self.model)

    def preview_image(self, step: Step, request: Request) -> np.ndarray:
        """The model's x0 prediction at ``step`` as an image (it predicts the clean image every step)."""
        return patches_to_image(np.array(step.preview), request.height, request.width)

    def summary(self, result: Result) -> str:
        """The tail of the one-line summary after an image: the seam-smoothing passes it cost."""
        passes = result.request.seam_passes
        return f" | seam smoothing +{passes} passes" if passes else ""

    def encode(self, request: Request, refs=None) -> Conditioning:
        uncond = UNCOND_PROMPT if request.negative_prompt is None else request.negative_prompt
        if refs is not None:
            return encode_with_references(self.model, self.vision, self.tokenizer, request.prompt, refs,
                                          request.recipe.guidance, uncond)
        if self.tokenizer is None:
            return encode_synthetic(self.model, request.prompt, request.height, request.width,
                                    request.recipe.guidance)
        return encode(self.model, self.tokenizer, request.prompt, request.height, request.width,
                      request.recipe.guidance, uncond)

    def steps(self, request: Request, cond: Conditioning, source: Optional[np.ndarray] = None,
              mask: Optional[np.ndarray] = None) -> Iterator[Step]:
        """The sampling steps of ``request``; from an image, ``source`` is its pixels at the render
        size and ``mask`` (inpainting) its mask there."""
        noise = make_noise_source(request.noise, request.seed)
        unit = initial_noise(noise, request.height, request.width)
        z0 = unit * request.recipe.noise_scale  # what initial_latent gives: the text-to-image start
        seams = request.seams
        start = None
        if request.start is not None:
            start = Start(request.start.first_step(request.recipe.steps), source_patches(source), unit,
                          None if mask is None else mask_patches(mask))
        return sample(self.model, cond, request.recipe, z0, noise=noise, seams=seams if seams.enabled else None,
                      start=start)

    def run(self, request: Request, on_step: Optional[Callable[[Step, float], None]] = None) -> Result:
        with wired_limit(self.model):
            return self._run(request, on_step)

    def _run(self, request: Request, on_step: Optional[Callable[[Step, float], None]]) -> Result:
        mx.reset_peak_memory()
        start = time.perf_counter()
        refs, request = self.prepare_references(request)
        key = (request.prompt, request.negative_prompt, request.height, request.width, request.recipe.uses_cfg)
        cache = self.conditioning_cache if refs is None else None
        cond = cache.get(key) if cache is not None else None
        if cond is None:
            cond = self.encode(request, refs)
            mx.eval(cond.arrays)
            if cache is not None:
                cache[key] = cond
        del refs
        if not self.keep_vision:
            self._vision = None
        mx.clear_cache()  # the prompt phase's temporaries are not needed while sampling
        encode_time = time.perf_counter() - start
        step_times, latent = [], None
        source = mask = None
        if request.start is not None:
            source = request.start.pixels(request.width, request.height)
            mask = request.start.mask_values(request.width, request.height)
        steps = self.steps(request, cond, source, mask)
        del cond  # the step generator holds the caches; they go when it is exhausted
        for step in steps:
            t0 = time.perf_counter()
            finite = mx.isfinite(step.latent).all()
            mx.eval(step.latent, step.preview, finite)
            step_times.append(time.perf_counter() - t0)
            # Already evaluated with the step, so reading it costs no extra device sync.
            if not bool(finite):
                raise NonFiniteLatentError(
                    f"the latent became non-finite (NaN or inf) at step {step.index + 1} of {step.total}; "
                    "no image written (check --guidance, --noise-scale, the model's weights and any --lora "
                    "and its scale)")
            latent = step.latent
            if on_step is not None:
                on_step(step, step_times[-1])
        del steps
        image = patches_to_image(np.array(latent), request.height, request.width)
        if request.blend_seams:
            image = blend_seams(image, request.blend_seams)
        if request.start is not None:
            image = request.start.finish(image, source, mask)
        total = time.perf_counter() - start
        peak = mx.get_peak_memory()
        mx.clear_cache()
        meta = {**request.metadata(), **self.describe()}
        return Result(image, request, step_times, encode_time, total, peak, meta)
