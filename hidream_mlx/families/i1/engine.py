"""HiDream-I1 behind the engine interface that ``generate``, the eval harness and the server drive.

The run is phased (``phases.PhasedEngine``: prompts, then the transformer once, then the decode,
each alone in memory). An init image (image-to-image, inpainting) is encoded by the VAE before the
transformer loads, and its latents are kept until no planned request needs them.

Seeds: ``request.seed`` is ``torch.Generator("cpu").manual_seed(seed)`` for the initial latents,
as the reference pipeline's generator. Dev and Fast also draw fresh noise at every step; the
reference takes it from torch's global RNG, here ``torch.manual_seed(step_noise_seed)`` (the seed
unless the request says otherwise). See the README's HiDream-I1 section for what matches.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from hidream_mlx import __version__
from hidream_mlx.family import NonFiniteLatentError, Result
from hidream_mlx.families.i1.recipes import FAMILY, I1Recipe, get_i1_recipe
from hidream_mlx.families.i1.requests import I1Request as Request
from hidream_mlx.families.i1.sampling import (Conditioning, GlobalTorchNoise, guided_prediction, i1_schedule,
                                            initial_latents, sample)
from hidream_mlx.families.i1.source import I1Source
from hidream_mlx.families.i1.start import SourceLatents, latent_mask, start_latents
from hidream_mlx.families.i1.phases import EMBEDDING_BUDGET, I1Step, PhasedEngine
from hidream_mlx.families.i1.text_encoding import PromptEmbedding, prompt_texts
from hidream_mlx.families.i1.weights import load_transformer_planned
from hidream_mlx.weights.lora_specs import LoRASpec
from hidream_mlx.weights.precision import parse_dtype
from hidream_mlx.weights.source import model_identity, recorded_name
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE

I1_DTYPES = ("bfloat16", "float32")


def check_load_options(dtype: str) -> None:
    """Refuse load options I1 cannot honour, before anything loads."""
    if dtype not in I1_DTYPES:
        raise ValueError(f"--dtype {dtype} is not available for HiDream-I1; choose {' or '.join(I1_DTYPES)}")


def request_texts(request: Request) -> list[str]:
    """The texts a request encodes (:func:`prompt_texts`: ``[negative, prompt]`` with CFG)."""
    return prompt_texts(request.prompt, request.negative_prompt, request.recipe.guidance)


class I1Engine(PhasedEngine):
    """A HiDream-I1 pipeline ready to run requests (weights load on first need, phase by phase)."""

    family = FAMILY

    def __init__(self, source: I1Source, dtype: str = "bfloat16", quantize_bits: Optional[int] = None,
                 encoder_bits: Optional[int] = None, loras: Sequence[LoRASpec] = ()):
        super().__init__(source, dtype, quantize_bits, encoder_bits, loras)
        self.stored = source.stored

    @classmethod
    def load(cls, model, dtype: str = "bfloat16", quantize_bits: Optional[int] = None, lazy: bool = False,
             loras: Sequence = (), encoder_bits: Optional[int] = None, llama: Optional[str] = None) -> "I1Engine":
        """An engine for ``model`` (an :class:`I1Source` or what resolves to one). Nothing heavy
        loads here: the encoders load in ``encode_prompts``/``run``, the transformer after them."""
        check_load_options(dtype)
        return cls(I1Source.resolve(model, llama=llama), dtype, quantize_bits, encoder_bits, loras)

    def request_texts(self, request: Request) -> list[str]:
        return request_texts(request)

    def _load_weights(self, dtype: mx.Dtype):
        return load_transformer_planned(self.path / "transformer", dtype, lazy=False, bits=self.quantize_bits,
                                        group_size=DEFAULT_GROUP_SIZE)

    def _reset_sources(self) -> None:
        self._sources = SourceLatents()  # init images encoded by the VAE

    def _before_transformer(self, requests: Sequence[Request]) -> None:
        self.encode_sources(requests)

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

    def _conditioning(self, request: Request) -> Conditioning:
        embedding = PromptEmbedding.concatenate(self._embeddings(request, request_texts(request)))
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

    def run(self, request: Request, on_step: Optional[Callable] = None) -> Result:
        """One image: the prompt's embeddings (encoded once), the transformer's steps, the decode."""
        start = time.perf_counter()
        cond = self._conditioning(request)
        encode_time = self._take_encode_time(request)
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
