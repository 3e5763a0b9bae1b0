"""The phased run that HiDream-I1 and HiDream-E1 share: each phase alone in memory, so the peak is the
largest phase, not the sum (what a Mac holds).

1. prompts: the four text encoders, one at a time (``TextEncoders`` frees each), over every
   distinct text of the planned requests (``encode_prompts``); the embeddings stay in a
   ``PromptCache`` and the encoders are gone before anything else loads;
2. the transformer, loaded once after the prompts (with the user's LoRAs), samples every image;
3. the VAE (decode, and the encode of a source image), kept once loaded: it is small; the
   transformer is dropped before the last decode when no planned image needs it again.
A run that meets a text not encoded yet (a long prompt file is encoded in groups of about
:data:`EMBEDDING_BUDGET`, or a request nobody planned) drops the transformer, encodes and loads
it again; ``keep_loaded`` keeps every component resident instead.

A subclass says which texts a request encodes (:meth:`PhasedEngine.request_texts`), how its
transformer loads (:meth:`PhasedEngine._load_weights`) and what a run does with them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from hidream_mlx.families.i1.lora_targets import check_loras
from hidream_mlx.families.i1.text_encoding import PromptCache, TextEncoders
from hidream_mlx.families.i1.vae import to_uint8
from hidream_mlx.families.i1.weights import load_vae
from hidream_mlx.memory import format_bytes, parameter_bytes
from hidream_mlx.quant.recipes import DEFAULT_GROUP_SIZE
from hidream_mlx.weights.lora import I1_KEYS, replace_loras
from hidream_mlx.weights.lora_specs import LoRASpec
from hidream_mlx.weights.precision import parse_dtype

EMBEDDING_BUDGET = 2 * 1024**3  # prompt embeddings kept at once (about 60 texts for the released model)


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


class PhasedEngine:
    """Weights that load on first need, phase by phase, for a source with I1's components."""

    images_word = "images"  # what a batch is made of, for the load line

    def __init__(self, source, dtype: str, quantize_bits: Optional[int], encoder_bits: Optional[int],
                 loras: Sequence[LoRASpec]):
        self.source = source
        self.path = source.path
        self.model_arg = source.arg
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
        self.keep_vision = False  # the interface O1's Engine has; these families have no vision tower
        self.default_recipe = source.variant
        self.encoders = TextEncoders(source.path, dtype=parse_dtype(dtype), llama_dir=source.llama.folder,
                                     quantize_bits=encoder_bits)
        self.prompts = PromptCache()
        self.transformer = None
        self.vae = None
        self.load_time = 0.0  # seconds spent loading the transformer
        self.phase_peaks: dict[str, int] = {}  # bytes: the largest MLX peak seen in each phase
        self._plan: list = []  # planned requests not run yet, in order
        self._planned = False
        self._unreported_encode = 0.0
        self._reset_sources()

    # --- what a subclass says ---

    def request_texts(self, request) -> list[str]:
        """The distinct texts ``request`` encodes."""
        raise NotImplementedError

    def _load_weights(self, dtype: mx.Dtype):
        """(the transformer, its quantization plan or None), loaded and evaluated."""
        raise NotImplementedError

    def _reset_sources(self) -> None:
        """Forget encoded source images (a run's end)."""

    def _before_transformer(self, requests: Sequence) -> None:
        """Work of the planned ``requests`` that runs before the transformer loads (a VAE encode)."""

    # --- the phases ---

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
            self._reset_sources()

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

    def encode_prompts(self, requests: Sequence) -> float:
        """Plan ``requests`` (run them in this order) and encode their texts before the
        transformer loads; returns the seconds spent."""
        self._plan, self._planned = list(requests), True
        return self._encode_group(self._plan) if self._plan else 0.0

    def _encode_group(self, upcoming: Sequence) -> float:
        """Encode the distinct texts of ``upcoming`` from its start, up to the embedding budget."""
        group: list[str] = []
        for request in upcoming:
            texts = [t for t in self.request_texts(request) if t not in group]
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

    def _embeddings(self, request, texts: list[str]) -> list:
        """The embeddings of ``texts`` (encoding the request's group first when one is missing)."""
        if any(t not in self.prompts for t in self.request_texts(request)):
            planned = self._plan if self._plan and self._plan[0] == request else [request]
            self._encode_group(planned)
        return self.prompts.lookup(self.encoders, texts)

    def _take_encode_time(self, request) -> float:
        """The encode seconds not reported yet (they go to this request), and the request off the plan."""
        seconds, self._unreported_encode = self._unreported_encode, 0.0
        if self._plan and self._plan[0] == request:
            self._plan.pop(0)
        return seconds

    def load_transformer(self) -> None:
        """Load the transformer if it is not resident (``load_time`` adds the seconds)."""
        if self.transformer is not None:
            return
        start = time.perf_counter()
        with self._phase("transformer"):
            self.transformer, plan = self._load_weights(parse_dtype(self.dtype))
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

    # --- what the application drives (hidream_mlx.family.Family's engine protocol) ---

    def prepare(self, requests: Sequence, note: Callable[[str], None]) -> None:
        """Every prompt encoded first (the encoders freed), then the transformer loaded once."""
        seconds = self.encode_prompts(requests)
        note(f"prompts encoded in {seconds:.1f} s ({len(self.prompts)} distinct texts); text encoders freed")
        self._before_transformer(requests)
        self.load_transformer()
        for lora in self.loras:
            note(lora.line())
        note(f"model loaded once in {self.load_time:.1f} s"
             f"{f' for {len(requests)} {self.images_word}' if len(requests) > 1 else ''}")

    def check_loras(self, specs: Sequence[LoRASpec]) -> None:
        """Read each LoRA against the transformer's module tree (built from its config: the weights
        may not be resident between prompts); LoRAError naming the file."""
        check_loras(self.source, specs)

    def resident_bytes(self) -> int:
        """The transformer's bytes once loaded (0 before: it loads after the prompts)."""
        return parameter_bytes(self.transformer) if self.transformer is not None else 0

    def preview_image(self, step: I1Step, request) -> np.ndarray:
        """The step's x0 prediction decoded by the VAE."""
        return step.image()

    def summary(self, result) -> str:
        return f" | phases: {self.phase_summary()}"

    def phase_summary(self) -> str:
        """``encoders 1.2 GB, transformer 9.8 GB, vae 2.1 GB``: each phase's measured peak."""
        return ", ".join(f"{name} {format_bytes(peak)}" for name, peak in self.phase_peaks.items())
