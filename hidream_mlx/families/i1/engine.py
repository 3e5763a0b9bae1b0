"""HiDream-I1 behind the engine interface that ``generate``, the eval harness and the server drive.

The run is split into phases so the peak is the largest phase, not the sum (what a Mac holds):
1. prompts: the four text encoders, one at a time (``TextEncoders`` frees each), over every
   distinct text of the planned requests (``encode_prompts``); the embeddings stay in a
   ``PromptCache`` and the encoders are gone before anything else loads;
2. the transformer, loaded once after the prompts, samples every image;
3. the VAE decode; the transformer is dropped first when no planned image needs it again.
A run that meets a text not encoded yet (a long prompt file is encoded in groups of about
:data:`EMBEDDING_BUDGET`, or a request nobody planned) drops the transformer, encodes and loads
it again; ``keep_loaded`` keeps every component resident instead.

Seeds: ``request.seed`` is ``torch.Generator("cpu").manual_seed(seed)`` for the initial latents,
as the reference pipeline's generator. Dev and Fast also draw fresh noise at every step; the
reference takes it from torch's global RNG, here ``torch.manual_seed(step_noise_seed)`` (the seed
unless the request says otherwise). See the README's HiDream-I1 section for what matches.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from hidream_mlx import __version__
from hidream_mlx.family import NonFiniteLatentError, Result
from hidream_mlx.memory import format_bytes, parameter_bytes
from hidream_mlx.families.i1.recipes import FAMILY, I1Recipe, get_i1_recipe
from hidream_mlx.families.i1.requests import I1Request as Request
from hidream_mlx.families.i1.sampling import (Conditioning, GlobalTorchNoise, guided_prediction, i1_schedule,
                                            initial_latents, sample)
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.i1.start import SourceLatents, latent_mask, start_latents
from hidream_mlx.families.i1.text_encoding import PromptCache, PromptEmbedding, TextEncoders, prompt_texts
from hidream_mlx.families.i1.vae import to_uint8
from hidream_mlx.families.i1.lora_targets import check_loras
from hidream_mlx.families.i1.weights import load_transformer_planned, load_vae
from hidream_mlx.weights.lora import I1_KEYS, replace_loras
from hidream_mlx.weights.lora_specs import LoRASpec
from hidream_mlx.weights.precision import parse_dtype
from hidream_mlx.weights.source import model_identity, recorded_name
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE

I1_DTYPES = ("bfloat16", "float32")
EMBEDDING_BUDGET = 2 * 1024**3  # prompt embeddings kept at once (about 60 texts for the released model)


def check_load_options(dtype: str) -> None:
    """Refuse load options I1 cannot honour, before anything loads."""
    if dtype not in I1_DTYPES:
        raise ValueError(f"--dtype {dtype} is not available for HiDream-I1; choose {' or '.join(I1_DTYPES)}")


def request_texts(request: Request) -> list[str]:
    """The texts a request encodes (:func:`prompt_texts`: ``[negative, prompt]`` with CFG)."""
    return prompt_texts(request.prompt, request.negative_prompt, request.recipe.guidance)


@dataclass
class I1Step:
    """One finished sampling step, as the CLI's progress callback sees it."""

    index: int
    total: int
    timestep: float
    latent: mx.array
    # The step's x0 prediction (``x - sigma * guided``, lazy: costs nothing unless decoded); None on
    # the flash sampler's last step, which calls no model.
    preview: Optional[mx.array] = None
    decode: Optional[Callable[[mx.array], np.ndarray]] = field(default=None, repr=False)

    def image(self) -> np.ndarray:
        """The x0 prediction as a uint8 image (one VAE decode, with the transformer resident)."""
        return self.decode(self.preview)


class I1Engine:
    """A HiDream-I1 pipeline ready to run requests (weights load on first need, phase by phase)."""

    family = FAMILY

    def __init__(self, source: I1Source, dtype: str = "bfloat16", quantize_bits: Optional[int] = None,
                 encoder_bits: Optional[int] = None, loras: Sequence[LoRASpec] = ()):
        self.source = source
        self.path = source.path
        self.model_arg = source.arg
        self.stored = source.stored
        self.dtype = dtype
        self.quantize_bits = quantize_bits
        self.encoder_bits = encoder_bits
        # Until the transformer loads: the stored plan, or what -q asks for (then the plan it ran with).
        asked = {"bits": quantize_bits, "group_size": DEFAULT_GROUP_SIZE} if quantize_bits else None
        self.quantization = source.quantization or asked
        self.loras: list = []  # LoRASummary per LoRA applied to the resident transformer
        self.lora_specs: tuple = tuple(check_loras(source, loras))  # applied whenever the transformer loads
        self._lora_keep: Optional[dict] = None  # originals the LoRAs replaced, kept only to switch in place
        self._switching = False
        self.keep_vision = False  # the interface O1's Engine has; I1 has no vision tower
        self.default_recipe = source.variant
        self.encoders = TextEncoders(source.path, dtype=parse_dtype(dtype), llama_dir=source.llama.folder,
                                     quantize_bits=encoder_bits)
        self.prompts = PromptCache()
        self.transformer = None
        self.vae = None
        self.load_time = 0.0  # seconds spent loading the transformer
        self.phase_peaks: dict[str, int] = {}  # bytes: the largest MLX peak seen in each phase
        self._plan: list[Request] = []  # planned requests not run yet, in order
        self._planned = False
        self._unreported_encode = 0.0
        self._sources = SourceLatents()  # init images encoded by the VAE

    @classmethod
    def load(cls, model, dtype: str = "bfloat16", quantize_bits: Optional[int] = None, lazy: bool = False,
             loras: Sequence = (), encoder_bits: Optional[int] = None, llama: Optional[str] = None) -> "I1Engine":
        """An engine for ``model`` (an :class:`I1Source` or what resolves to one). Nothing heavy
        loads here: the encoders load in ``encode_prompts``/``run``, the transformer after them."""
        check_load_options(dtype)
        return cls(I1Source.resolve(model, llama=llama), dtype, quantize_bits, encoder_bits, loras)

    @property
    def keep_loaded(self) -> bool:
        """True: the encoders and the transformer stay resident (faster on new prompts; the peak
        is then about their sum, not the largest phase)."""
        return self.encoders.keep_loaded

    @keep_loaded.setter
    def keep_loaded(self, value: bool) -> None:
        self.encoders.keep_loaded = bool(value)

    # The O1 Engine's batch hook: the CLI sets {} for a run and None after it (drop the embeddings).
    @property
    def conditioning_cache(self) -> PromptCache:
        return self.prompts

    @conditioning_cache.setter
    def conditioning_cache(self, value) -> None:
        if value is None:
            self.prompts = PromptCache()
            self._plan, self._planned = [], False
            self._sources = SourceLatents()

    def describe(self) -> dict:
        return {
            # What it was converted from and the Llama, by name (a repo id, or a folder's name: never a path);
            # the model itself by name and fingerprint (model_identity).
            **({"converted_from": recorded_name(self.stored["source"])} if self.stored.get("source") else {}),
            "family": FAMILY,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "llama": None if self.source.llama.given is None else recorded_name(self.source.llama.given),
            "encoder_bits": self.encoder_bits,
            **({"loras": [s.to_dict() for s in self.loras]} if self.loras else {}),
            "tool_version": __version__,
            **model_identity(self.source),
        }

    def recipe(self, name: Optional[str] = None) -> I1Recipe:
        return get_i1_recipe(name or self.default_recipe)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        mx.reset_peak_memory()
        try:
            yield
        finally:
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), mx.get_peak_memory())

    def _text_bytes(self) -> int:
        """Bytes one encoded text keeps (Llama stack, T5 sequence, pooled)."""
        t5_width, llama_width = self.source.transformer.caption_channels
        tokens = self.encoders.max_sequence_length
        values = self.source.llama.num_layers * tokens * llama_width + tokens * t5_width
        return (values + self.source.transformer.text_emb_dim) * parse_dtype(self.dtype).size

    def _drop_transformer(self) -> None:
        if self.transformer is not None and not self.keep_loaded:
            self.transformer = None
            mx.clear_cache()

    def encode_prompts(self, requests: Sequence[Request]) -> float:
        """Plan ``requests`` (run them in this order) and encode their texts before the
        transformer loads; returns the seconds spent."""
        self._plan, self._planned = list(requests), True
        return self._encode_group(self._plan) if self._plan else 0.0

    def _encode_group(self, upcoming: Sequence[Request]) -> float:
        """Encode the distinct texts of ``upcoming`` from its start, up to the embedding budget."""
        group: list[str] = []
        for request in upcoming:
            texts = [t for t in request_texts(request) if t not in group]
            if group and (len(group) + len(texts)) * self._text_bytes() > EMBEDDING_BUDGET:
                break
            group += texts
        if all(t in self.prompts for t in group):
            return 0.0
        start = time.perf_counter()
        self._drop_transformer()
        self.prompts.keep_only(group)
        with self._phase("encoders"):
            embeddings = self.prompts.lookup(self.encoders, group)
            mx.eval([(e.pooled_embeds, e.t5_embeds, e.llama_hidden_states) for e in embeddings])
        if not self.keep_loaded:
            self.encoders.free()
        mx.clear_cache()
        seconds = time.perf_counter() - start
        self._unreported_encode += seconds
        return seconds

    def load_transformer(self) -> None:
        """Load the transformer if it is not resident (``load_time`` adds the seconds)."""
        if self.transformer is not None:
            return
        start = time.perf_counter()
        with self._phase("transformer"):
            self.transformer, plan = load_transformer_planned(self.path / "transformer", parse_dtype(self.dtype),
                                                              lazy=False, bits=self.quantize_bits,
                                                              group_size=DEFAULT_GROUP_SIZE)
        self.quantization = plan.description if plan is not None else None
        if self.lora_specs:
            self.loras, keep = replace_loras(self.transformer, self.lora_specs, {}, I1_KEYS)
            self._lora_keep = keep if self._switching else None  # unkept originals are freed now
        self.load_time += time.perf_counter() - start

    def use_loras(self, specs: Sequence[LoRASpec]) -> None:
        """Run with exactly ``specs`` from now on (eval jobs, server requests; checked now). A
        resident transformer swaps them in place; otherwise they apply when it loads."""
        specs = tuple(check_loras(self.source, specs))
        self._switching = True
        if specs == self.lora_specs:
            return
        self.lora_specs = specs
        if self.transformer is None:
            self.loras = []
        elif self._lora_keep is None and self.loras:  # the originals were not kept: load afresh
            self.transformer, self.loras = None, []
            mx.clear_cache()
        else:
            try:
                self.loras, self._lora_keep = replace_loras(self.transformer, specs, self._lora_keep or {}, I1_KEYS)
            except BaseException:  # replace_loras left the plain transformer: say so
                self.lora_specs, self.loras, self._lora_keep = (), [], {}
                raise

    def _conditioning(self, request: Request) -> Conditioning:
        texts = request_texts(request)
        if any(t not in self.prompts for t in texts):
            planned = self._plan if self._plan and self._plan[0] == request else [request]
            self._encode_group(planned)
        embedding = PromptEmbedding.concatenate(self.prompts.lookup(self.encoders, texts))
        return Conditioning(embedding.t5_embeds, embedding.llama_hidden_states, embedding.pooled_embeds)

    # --- image-to-image: the source in latent space (families/i1/start.py) ---

    def encode_sources(self, requests: Sequence[Request]) -> None:
        """Encode the init image of each of ``requests`` once with the VAE (before the transformer
        loads, so the encode's peak does not stack on it); the latents are kept until used."""
        for request in requests:
            if request.start is not None:
                self._source_latents(request)

    def _source_latents(self, request: Request) -> mx.array:
        return self._sources.get(request, self._encode_source)

    def _encode_source(self, pixels: np.ndarray) -> mx.array:
        with self._phase("vae"):
            latents = self._load_vae().encode_uint8(pixels)
            mx.eval(latents)
        return latents

    def latent_shape(self, request: Request) -> tuple[int, int, int, int]:
        """``[1, C, 2*(H//16), 2*(W//16)]`` as the pipeline's ``prepare_latents``."""
        d = 2 * self.source.vae_scale
        return (1, self.source.transformer.in_channels, 2 * (request.height // d), 2 * (request.width // d))

    def _sample(self, request: Request, cond: Conditioning, on_step: Optional[Callable],
                mask: Optional[np.ndarray] = None) -> tuple[mx.array, list]:
        rec: I1Recipe = request.recipe
        cfg = self.source.transformer
        schedule = i1_schedule(rec.sampler_recipe(), official_mu=rec.mu_shift, max_seq=cfg.max_seq)
        noise_seed = request.seed if request.step_noise_seed is None else request.step_noise_seed
        step_noise = GlobalTorchNoise(noise_seed) if rec.scheduler == "flash" else None
        compute = parse_dtype(self.dtype)
        transformer = self.transformer

        def model(x, t, t5, llama, pooled):
            return transformer(x.astype(compute), t, t5, llama, pooled)

        step_times: list[float] = []
        last = [time.perf_counter()]
        latents = initial_latents(request.seed, self.latent_shape(request))  # the text-to-image start
        first, after_step = 0, None
        if request.start is not None:
            first = request.start.first_step(rec.steps)
            repaint = None if mask is None else latent_mask(mask, self.source.vae_scale)
            latents, after_step = start_latents(self._source_latents(request), latents, schedule, first, repaint)
        before = [latents]  # the step's input, for its x0 prediction
        total = len(schedule) - first

        def each_step(i, output, x):
            finite = mx.isfinite(x).all()
            if not bool(finite):  # x is already evaluated: one tiny reduction per step
                raise NonFiniteLatentError(f"the latent became non-finite (NaN or inf) at step {i - first + 1} of "
                                           f"{total}; no image written (check --guidance, the weights "
                                           "and any --lora and its scale)")
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            x0 = None if output is None else before[0] - float(schedule.sigmas[i]) * guided_prediction(
                output, rec.guidance)
            before[0] = x
            if on_step is not None:
                on_step(I1Step(i - first, total, float(schedule.timesteps[i]), x, x0, self._vae_image),
                        step_times[-1])

        with self._phase("transformer"):
            final = sample(model, cond, latents, rec.sampler_recipe(), schedule, step_noise, each_step, first,
                           after_step)
        return final, step_times

    def _load_vae(self):
        """The VAE (encoder and decoder), loaded once, then kept: it is small."""
        if self.vae is None:
            self.vae = load_vae(self.path / "vae", parse_dtype(self.dtype), lazy=False)
        return self.vae

    def _vae_image(self, latent: mx.array) -> np.ndarray:
        """Transformer-space latents [1, C, h, w] -> uint8 HWC."""
        image = to_uint8(self._load_vae().decode_latents(latent.astype(parse_dtype(self.dtype))))[0]
        mx.eval(image)
        return np.array(image)

    def _decode(self, latent: mx.array) -> np.ndarray:
        if self._planned and not self._plan:
            self._drop_transformer()  # no planned image needs it again: the VAE phase runs alone
        with self._phase("vae"):
            return self._vae_image(latent)

    def run(self, request: Request, on_step: Optional[Callable] = None) -> Result:
        """One image: the prompt's embeddings (encoded once), the transformer's steps, the decode."""
        start = time.perf_counter()
        cond = self._conditioning(request)
        encode_time, self._unreported_encode = self._unreported_encode, 0.0
        if self._plan and self._plan[0] == request:
            self._plan.pop(0)
        mask = None
        if request.start is not None:
            self._source_latents(request)  # before the transformer loads when it is not resident
            mask = request.start.mask_values(request.width, request.height)
        self.load_transformer()
        latent, step_times = self._sample(request, cond, on_step, mask)
        del cond
        if request.start is not None:
            self._sources.release(request, self._plan)
        image = self._decode(latent)
        if request.start is not None:
            image = request.start.finish(image, request.start.pixels(request.width, request.height), mask)
        total = time.perf_counter() - start
        meta = {**request.metadata(), **self.describe(),
                "second_shift": request.recipe.second_shift(self.source.transformer.max_seq)}
        return Result(image, request, step_times, encode_time, total, max(self.phase_peaks.values()), meta)

    # --- what the application drives (hidream_mlx.family.Family's engine protocol) ---

    def prepare(self, requests: Sequence[Request], note: Callable[[str], None]) -> None:
        """Every prompt encoded first (the encoders freed), then the transformer loaded once."""
        seconds = self.encode_prompts(requests)
        note(f"prompts encoded in {seconds:.1f} s ({len(self.prompts)} distinct texts); text encoders freed")
        self.encode_sources(requests)
        self.load_transformer()
        for lora in self.loras:
            note(lora.line())
        note(f"model loaded once in {self.load_time:.1f} s"
             f"{f' for {len(requests)} images' if len(requests) > 1 else ''}")

    def announce(self, request: Request) -> list[str]:
        rec = request.recipe
        second = rec.second_shift(self.source.transformer.max_seq)
        shift = f"shift {rec.shift:g}" + (f" (UniPC second shift exp(mu) = {second:.3f})" if rec.mu_shift else "")
        lines = [f"size {request.size_note}; recipe {rec.name}, {rec.steps} steps, guidance {rec.guidance:g}, "
                 f"{shift}, seed {request.seed}"]
        if not rec.official:
            why = (f" (--shift: UniPC shifts twice by {rec.shift:g}, as diffusers' pipeline, not by exp(mu))"
                   if rec.scheduler == "unipc" and not rec.mu_shift else "")
            lines.append(f"note: settings differ from the released {rec.name} recipe{why}")
        return lines

    def check_loras(self, specs: Sequence[LoRASpec]) -> None:
        """Read each LoRA against the transformer's module tree (built from its config: the weights
        may not be resident between prompts); LoRAError naming the file."""
        check_loras(self.source, specs)

    def resident_bytes(self) -> int:
        """The transformer's bytes once loaded (0 before: it loads after the prompts)."""
        return parameter_bytes(self.transformer) if self.transformer is not None else 0

    def preview_image(self, step: "I1Step", request: Request) -> np.ndarray:
        """The step's x0 prediction decoded by the VAE."""
        return step.image()

    def summary(self, result: Result) -> str:
        return f" | phases: {self.phase_summary()}"

    def phase_summary(self) -> str:
        """``encoders 1.2 GB, transformer 9.8 GB, vae 2.1 GB``: each phase's measured peak."""
        return ", ".join(f"{name} {format_bytes(peak)}" for name, peak in self.phase_peaks.items())
