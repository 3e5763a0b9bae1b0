"""HiDream-E1 editing behind the same engine interface as ``I1Engine`` (``run(request) -> Result``).

A request edits one source image (``request.references``, exactly one) with an instruction
(``request.prompt``) under an :class:`~.recipes.E1Recipe`; ``request.width/height`` are
the budget (E1.1) or the exact size (E1-Full). Phases, each alone in memory as I1's
(``phases.PhasedEngine``):

1. prompts: the four encoders over every distinct text of the planned requests (prompt,
   negative prompt, E1-Full's target description), then freed;
2. the source: resized by the recipe's rule and encoded by the VAE (posterior mode); the
   latents are kept per source and size, the VAE stays (it is small);
3. the edit transformer (E1.1's own; or I1-Full's with E1-Full's partial tensors and its LoRA
   as a switchable side path), loaded once; the refine stage switches E1-Full's LoRA off as the
   official run does (E1.1's official weight swap changes nothing, so nothing is done);
4. the decode (and, with ``keep_source_size``, the resize back to the source's size).

Seeds: ``request.seed`` is ``torch.Generator("cpu").manual_seed(seed)``'s ``randn`` for the
initial latents (``noise="torch"``), as the fixtures record; the official scripts draw on a CUDA
generator, which is not reproduced. ``noise="mlx"`` draws from ``mx.random`` instead.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from hidream_mlx import __version__
from hidream_mlx.families.i1.e1.metadata import model_metadata, run_metadata
from hidream_mlx.families.i1.e1.recipes import FAMILY, E1Recipe, get_e1_recipe
from hidream_mlx.families.i1.e1.requests import E1Request as Request
from hidream_mlx.families.i1.e1.sampling import EDIT, EditConditioning, EditStep, edit_texts, sample_edit
from hidream_mlx.families.i1.e1.sizes import (ResizePlan, edit_max_seq, resize_plan, resize_source,
                                                restore_source_size)
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.families.i1.engine import I1_DTYPES
from hidream_mlx.families.i1.phases import I1Step, PhasedEngine
from hidream_mlx.families.i1.sampling import Conditioning
from hidream_mlx.families.i1.text_encoding import PromptEmbedding
from hidream_mlx.families.i1.weights import load_transformer_planned
from hidream_mlx.family import NonFiniteLatentError, Result
from hidream_mlx.images import open_rgb
from hidream_mlx.noise import TorchRandn
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE
from hidream_mlx.weights.lora import attach_adapter, set_adapters_enabled
from hidream_mlx.weights.lora_specs import LoRASpec
from hidream_mlx.weights.precision import parse_dtype
from hidream_mlx.weights.source import model_identity

NOISE_KINDS = ("torch", "mlx")


def request_texts(request: Request) -> list[str]:
    """The distinct texts a request encodes, in first-use order."""
    rec: E1Recipe = request.recipe
    edit, refine = edit_texts(request.prompt, request.negative, rec)
    return list(dict.fromkeys(edit + (refine if rec.refine_steps else [])))


def initial_noise(kind: str, seed: int, shape: tuple) -> mx.array:
    """``torch.randn(shape)`` of a CPU generator seeded ``seed`` (the pipeline's draw), or MLX's."""
    if kind == "torch":
        return mx.array(TorchRandn(seed).randn(tuple(shape)))
    if kind == "mlx":
        return mx.random.normal(tuple(shape), dtype=mx.float32, key=mx.random.key(seed))
    raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")


def load_edit_transformer(source: E1Source, dtype, bits: Optional[int] = None):
    """(the edit transformer, its quantization plan): E1.1's own, or I1-Full's with E1-Full's partial
    tensors in and its LoRA beside as a switchable side path; ``bits`` quantizes it as it streams in."""
    transformer, plan = load_transformer_planned(source.transformer_folder, dtype, lazy=False, bits=bits,
                                                 group_size=DEFAULT_GROUP_SIZE, infos=source.index)
    if source.e1_full is not None:
        attach_adapter(transformer, source.e1_full.lora, dtype)
    return transformer, plan


class E1Engine(PhasedEngine):
    """A HiDream-E1 model on its I1-Full base, ready to edit (weights load on first need)."""

    family = FAMILY
    images_word = "edits"

    def __init__(self, source: E1Source, dtype: str = "bfloat16", quantize_bits: Optional[int] = None,
                 encoder_bits: Optional[int] = None, loras: Sequence[LoRASpec] = ()):
        if dtype not in I1_DTYPES:
            raise ValueError(f"--dtype {dtype} is not available for HiDream-E1; choose {' or '.join(I1_DTYPES)}")
        super().__init__(source, dtype, quantize_bits, encoder_bits, loras)

    @classmethod
    def load(cls, model, dtype: str = "bfloat16", quantize_bits: Optional[int] = None, lazy: bool = False,
             loras: Sequence = (), encoder_bits: Optional[int] = None, llama: Optional[str] = None, *,
             base: Optional[str] = None) -> "E1Engine":
        """An engine for ``model`` on ``base`` (default HiDream-I1-Full; an :class:`E1Source` or
        what resolves to one), with ``I1Engine.load``'s other arguments; nothing heavy loads here."""
        return cls(E1Source.resolve(model, base, llama=llama), dtype, quantize_bits, encoder_bits, loras)

    @property
    def base(self) -> str:
        """``--base`` as given (the server's fit check reads the load options off the engine)."""
        return self.source.base_arg

    @property
    def llama(self) -> Optional[str]:
        return self.source.llama.given

    def describe(self) -> dict:
        # The model, its base and the Llama by name (a repo id, or a folder's name: never a path).
        return {"family": FAMILY, **model_metadata(self.source),
                "dtype": self.dtype, "quantization": self.quantization, "encoder_bits": self.encoder_bits,
                **({"loras": [s.to_dict() for s in self.loras]} if self.loras else {}), "tool_version": __version__,
                **model_identity(self.source)}

    def recipe(self, name: Optional[str] = None) -> E1Recipe:
        return get_e1_recipe(name or self.default_recipe)

    def request_texts(self, request: Request) -> list[str]:
        return request_texts(request)

    def _load_weights(self, dtype: mx.Dtype):
        return load_edit_transformer(self.source, dtype, self.quantize_bits)

    def _reset_sources(self) -> None:
        self._sources: dict[tuple, tuple[mx.array, ResizePlan]] = {}  # encoded sources by file and size

    def encode_prompts(self, requests: Sequence[Request]) -> float:
        """Plan ``requests`` (run in this order) and encode their texts before the transformer loads.
        Every request's source is checked first (one image, readable, a size its rule can make)."""
        for request in requests:
            self.edit_plan(request)
        return super().encode_prompts(requests)

    def _conditioning(self, request: Request) -> EditConditioning:
        rec: E1Recipe = request.recipe
        edit, refine = edit_texts(request.prompt, request.negative, rec)

        def batch(texts):
            e = PromptEmbedding.concatenate(self._embeddings(request, texts))
            return Conditioning(e.t5_embeds, e.llama_hidden_states, e.pooled_embeds)

        return EditConditioning(batch(edit), batch(refine) if rec.refine_steps else None)

    def edit_plan(self, request: Request) -> ResizePlan:
        """How the request's source is resized (reads the image's size, not its weights)."""
        rec: E1Recipe = request.recipe
        return resize_plan(rec.size_rule, open_rgb(request.source).size, request.width, request.height)

    def source_latents(self, request: Request) -> tuple[mx.array, ResizePlan]:
        """The resized source's latents [1, C, h, w] (encoded once per file, size and rule)."""
        path, rec = request.source, request.recipe
        stat = os.stat(path)
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, rec.size_rule, request.width, request.height)
        if key not in self._sources:
            image = open_rgb(path)
            plan = resize_plan(rec.size_rule, image.size, request.width, request.height)
            pixels = np.asarray(resize_source(image, rec.size_rule, request.width, request.height))
            with self._phase("vae"):
                latents = self._load_vae().encode_uint8(pixels).astype(mx.float32)
                mx.eval(latents)
            self._sources[key] = (latents, plan)
        return self._sources[key]

    def _on_stage(self, stage: str) -> None:
        """The official refine swap: E1-Full's LoRA off for the refine stage (on for editing)."""
        if self.source.e1_full is not None:
            set_adapters_enabled(self.transformer, stage == EDIT)

    def _sample(self, request: Request, cond: EditConditioning, image_latents: mx.array,
                on_step: Optional[Callable]) -> tuple[mx.array, list]:
        rec: E1Recipe = request.recipe
        schedule = self.source.scheduler.schedule(rec.steps)
        max_seq = edit_max_seq(request.width, request.height, self.source.pixels_per_token)
        compute, transformer = parse_dtype(self.dtype), self.transformer

        def model(x, t, t5, llama, pooled, seq):
            return transformer(x.astype(compute), t, t5, llama, pooled, seq)

        step_times: list[float] = []
        last = [time.perf_counter()]
        latents = initial_noise(request.noise, request.seed, tuple(image_latents.shape))
        before = [latents]

        def each_step(step: EditStep):
            if not bool(mx.isfinite(step.latent).all()):  # already evaluated: one tiny reduction per step
                raise NonFiniteLatentError(f"the latent became non-finite (NaN or inf) at step {step.index + 1} of "
                                           f"{len(schedule)}; no image written (check --guidance and the weights)")
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            x0 = before[0] - float(schedule.sigmas[step.index]) * step.guided
            before[0] = step.latent
            if on_step is not None:
                on_step(I1Step(step.index, len(schedule), float(schedule.timesteps[step.index]), step.latent, x0,
                               self._vae_image), step_times[-1])

        with self._phase("transformer"):
            final = sample_edit(model, cond, image_latents, latents, rec, schedule, max_seq, self._on_stage, each_step)
        return final, step_times

    def run(self, request: Request, on_step: Optional[Callable] = None) -> Result:
        """One edit: embeddings (encoded once), the source's latents, the steps, the decode."""
        start = time.perf_counter()
        if request.noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {request.noise!r}; choose one of {', '.join(NOISE_KINDS)}")
        self.edit_plan(request)  # one readable source at a size its rule can make, before anything loads
        cond = self._conditioning(request)
        encode_time = self._take_encode_time(request)
        image_latents, plan = self.source_latents(request)
        self.load_transformer()
        latent, step_times = self._sample(request, cond, image_latents, on_step)
        del cond
        image = self._decode(latent)
        if request.recipe.keep_source_size:
            image = np.asarray(restore_source_size(Image.fromarray(image), plan.source))
        total = time.perf_counter() - start
        meta = {**request.metadata(), **run_metadata(request, plan, self.source), **self.describe()}
        return Result(image, request, step_times, encode_time, total, max(self.phase_peaks.values()), meta)

    # --- what the application drives (hidream_mlx.family.Family's engine protocol) ---

    def announce(self, request: Request) -> list[str]:
        rec: E1Recipe = request.recipe
        plan = self.edit_plan(request)
        refine = f"refine from step {rec.refine_start + 1}" if rec.refine_steps else "no refine stage"
        lines = [f"edit {request.source.name} {plan.source[0]}x{plan.source[1]} at {plan.size[0]}x{plan.size[1]}; "
                 f"recipe {rec.name}, {rec.steps} steps, guidance {rec.guidance:g}, image guidance "
                 f"{rec.image_guidance:g}, {refine}, seed {request.seed}"]
        if not rec.official:
            lines.append(f"note: settings differ from the released {rec.name} recipe")
        return lines
