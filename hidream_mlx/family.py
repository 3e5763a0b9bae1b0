"""The contract between the application and the model families.

The application (``cli``, ``server``, ``harness``, ``workflow``, ``requests``) reaches a model
family only through :class:`Family`: every family package (``hidream_mlx/families/<name>/``)
implements it once, and ``hidream_mlx/families/__init__.py`` registers it with one line. Beside
the interface this module holds the vocabulary both sides share: the errors a family raises for
a user, the ranges of the options a user sets, the one CFG rule, and what a finished image is.
It imports nothing from the families or the application.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import numpy as np

from hidream_mlx.files import file_record
from hidream_mlx.images import composite, edge_blend, read_mask, read_rgb_size, resized_rgb
from hidream_mlx.schedulers import smallest_strength, start_step, steps_to_run

Note = Callable[[str], None]


class RequestError(ValueError):
    """An option value that cannot run; the message names the option as the CLI spells it."""


class ReplayError(ValueError):
    """A recorded case file that cannot be replayed."""


class NonFiniteLatentError(ValueError):
    """The latent held NaN or inf after a step: the image would be black or garbage."""


# --- options: what a user may set, checked the same way for every family ----------------------

@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_open: bool = False  # the low end itself is excluded (a positive number)

    def text(self) -> str:
        def show(v):
            return str(v) if isinstance(v, int) else f"{v:g}"
        return f"{'>' if self.low_open else '>='} {show(self.low)} and <= {show(self.high)}"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


SEED_MAX = 2**32 - 1  # the official (torch) generators keep 32 bits of a seed; no silent wrap
MAX_SIDE = 16384  # a requested side before a family's size rule; each family bounds the area itself
PATCH_SIDE = 32  # the widest seam band --blend-seams may ask for is half of O1's 32 px patch

# Stated in each option's --help and checked before loading.
RANGES: dict[str, Range] = {
    "seed": Range(0, SEED_MAX),
    "width": Range(1, MAX_SIDE),
    "height": Range(1, MAX_SIDE),
    "steps": Range(1, 1000),
    "guidance": Range(0, 100),
    "shift": Range(0, 100, low_open=True),
    "noise_scale": Range(0, 100, low_open=True),
    "s_noise": Range(0, 100),
    "noise_clip": Range(0, 100),
    "blend_seams": Range(0, PATCH_SIDE // 2),
    "seam_smoothing": Range(0, 1),
    "seam_strength": Range(0, 1),
    "preview_every": Range(0, 1000),
    "step_noise_seed": Range(0, SEED_MAX),
    "strength": Range(0, 1, low_open=True),
    "mask_blur": Range(0, 64),
    "image_guidance": Range(0, 100),
    "refine_strength": Range(0, 1),
}
INTEGER_OPTIONS = ("seed", "width", "height", "steps", "blend_seams", "preview_every", "step_noise_seed",
                   "mask_blur")


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def range_help(name: str) -> str:
    """The range of ``name`` for its --help text."""
    return RANGES[name].text()


def check_number(name: str, value) -> None:
    """Refuse a non-number, NaN/inf, a float for an integer option, or a value outside RANGES."""
    flag = option_flag(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RequestError(f"{flag} must be a finite number, got {value}")
    if name in INTEGER_OPTIONS and not isinstance(value, int):
        raise RequestError(f"{flag} must be a whole number, got {value}")
    valid = RANGES[name]
    if not valid.contains(value):
        raise RequestError(f"{flag} must be {valid.text()}, got {value}")


def uses_cfg(guidance: float) -> bool:
    """The one rule for CFG: a scale above 1 runs the unconditional pass; 1 or less runs none
    (the official pipelines' ``guidance_scale > 1`` test)."""
    return guidance > 1.0


# The recipe numbers a user may override (what an image records under ``recipe_settings``).
RECIPE_NUMBERS = ("steps", "guidance", "shift", "noise_scale", "s_noise", "noise_clip", "image_guidance",
                  "refine_strength")

# The explore -> re-render stages a user picks by name; each family says what a stage means for it.
PRESET_NAMES = ("quick", "standard", "high", "official")


# --- starting from an image: image-to-image and inpainting, the same rules for every family -----

DEFAULT_STRENGTH = 0.8  # without a mask, as diffusers' image-to-image pipelines
DEFAULT_INPAINT_STRENGTH = 1.0  # with one, as their inpainting pipelines
DEFAULT_MASK_BLUR = 4
START_OPTIONS = ("init_image", "strength", "mask", "mask_blur")


@dataclass(frozen=True)
class StartImage:
    """The picture a run starts from (``--init-image``), how much of the schedule runs
    (``strength``) and, for inpainting, the ``mask`` (white repaints, black keeps) whose edge the
    final composite blends over ``mask_blur`` pixels. Each family brings the source to its own
    state at the first step that runs; this holds what they share."""

    path: str
    size: tuple[int, int]  # the source's own (width, height)
    strength: float
    mask: Optional[str] = None
    mask_blur: int = DEFAULT_MASK_BLUR

    def run_steps(self, steps: int) -> int:
        return steps_to_run(steps, self.strength)

    def first_step(self, steps: int) -> int:
        return start_step(steps, self.strength)

    def pixels(self, width: int, height: int) -> np.ndarray:
        """The source as uint8 RGB HWC at the render size."""
        return resized_rgb(self.path, width, height)

    def mask_values(self, width: int, height: int) -> Optional[np.ndarray]:
        """The mask as float32 [height, width] (1 repaints), or None without one."""
        return None if self.mask is None else read_mask(self.mask, width, height)

    def finish(self, image: np.ndarray, source: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
        """The final image: with a mask, the source's own pixels wherever it is black, blended over
        ``mask_blur`` pixels into the black along its edge; without one, ``image`` as sampled."""
        return image if mask is None else composite(image, source, edge_blend(mask, self.mask_blur))

    def metadata(self, steps: int) -> dict:
        """What an image records: the files by name and sha256 (never their folder), the numbers,
        and how many of the recipe's ``steps`` ran."""
        meta = {"init_image": file_record(self.path), "strength": self.strength,
                "steps_run": self.run_steps(steps)}
        if self.mask is not None:
            meta.update(mask=file_record(self.mask), mask_blur=self.mask_blur)
        return meta

    def size_refused(self, error: ValueError) -> RequestError:
        """``--no-snap`` refusing the source's own size: where the size came from and what to do."""
        w, h = self.size
        return RequestError(f"--init-image {Path(self.path).name} is {w}x{h}, which --no-snap cannot render as it "
                            f"is ({error}); give --width/--height (the source is resized to them) or leave out "
                            "--no-snap")

    def aspect_note(self, width: int, height: int) -> Optional[str]:
        """A note when the render size stretches the source by more than 1 % (it is resized, not cropped)."""
        sw, sh = self.size
        if abs(width * sh - height * sw) <= 0.01 * width * sh:
            return None
        return (f"note: --init-image {Path(self.path).name} is {sw}x{sh}; it is resized to {width}x{height}, "
                f"which changes its aspect ({sw / sh:.3f} -> {width / height:.3f})")


def _image_size(flag: str, path) -> tuple[int, int]:
    try:
        return read_rgb_size(path)
    except ValueError as e:
        raise RequestError(f"{flag} {e}") from None


def start_image(options: dict, steps: int) -> Optional[StartImage]:
    """The checked :class:`StartImage` of a request's options (None without ``init_image``);
    ``steps`` is the recipe's step count, of which at least one must run."""
    init, mask = options.get("init_image"), options.get("mask")
    strength, blur = options.get("strength"), options.get("mask_blur")
    if init is None:
        for name in ("mask", "strength", "mask_blur"):
            if options.get(name) is not None:
                raise RequestError(f"{option_flag(name)} needs --init-image (the picture the run starts from)")
        return None
    if blur is not None and mask is None:
        raise RequestError("--mask-blur needs --mask (it blends the mask's edge)")
    for name, value in (("strength", strength), ("mask_blur", blur)):
        if value is not None:
            check_number(name, value)
    size = _image_size("--init-image", init)
    if mask is not None:
        _image_size("--mask", mask)  # the same decoder reads it as a mask
    if strength is None:
        strength = DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH
    if steps_to_run(steps, strength) < 1:
        raise RequestError(f"--strength {strength:g} runs no step of {steps} (int({steps} x {strength:g}) = 0); "
                           f"the smallest strength that runs one is {smallest_strength(steps):g}")
    return StartImage(str(init), size, float(strength), None if mask is None else str(mask),
                      DEFAULT_MASK_BLUR if blur is None else blur)


def recorded_start_settings(meta: dict) -> dict:
    """The start-image numbers an image records, as options (``--from-image``); the files themselves
    are found again by the application (by name and sha256)."""
    if not meta.get("init_image"):
        return {}
    settings = {"strength": meta.get("strength")}
    if meta.get("mask"):
        settings["mask_blur"] = meta.get("mask_blur")
    return {k: v for k, v in settings.items() if v is not None}


# --- what a run gives back ----------------------------------------------------------------------

@dataclass
class Result:
    image: np.ndarray  # uint8 HWC
    request: object
    step_times: list[float]
    encode_time: float
    total_time: float
    peak_memory: int  # bytes, MLX's peak during this image
    metadata: dict = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        return float(np.median(self.step_times)) if self.step_times else 0.0


# --- the interface ------------------------------------------------------------------------------

class Family:
    """One model family as the application sees it.

    A *source* (what :meth:`resolve` returns) is everything known about a model before any weight
    loads: its folder, name, fingerprint, stored quantization and notes; it carries ``family``
    (this family's :attr:`name`). A *request* (what :meth:`build_request` returns) is one checked
    image to make: ``prompt``, ``seed``, ``width``, ``height``, ``size_note``, ``recipe`` (with
    ``name``, ``steps``, ``guidance``, ``official``, ``uses_cfg``), ``start`` (a :class:`StartImage`
    or None), ``run_steps`` (the steps that run: ``recipe.steps``, fewer from an image) and
    ``metadata()``. An *engine*
    (what :meth:`load_engine` returns) makes images:

    * ``prepare(requests, note)``: everything before the first image (a family that loads its
      weights phase by phase encodes every prompt here); ``note`` gets one line per event;
    * ``run(request, on_step) -> Result``: one image; ``on_step(step, seconds)`` after each step,
      where ``step.index``, ``step.total`` and ``preview_image(step)`` give progress and x0 previews;
    * ``announce(request) -> list[str]`` and ``summary(result) -> str``: what the CLI prints;
    * ``describe()``: the model part of an image's metadata; ``resident_bytes()``: the weights
      resident while sampling (0 before they load); ``load_time``, ``loras``,
      ``use_loras(specs)`` (switch LoRAs between jobs), ``default_recipe``, ``family``.
    """

    name: ClassVar[str]  # stored as "family" in every image's metadata
    title: ClassVar[str]  # how messages name it: "HiDream-O1"
    recipes: ClassVar[tuple[str, ...]]  # the --recipe names it accepts
    # Options only this family reads, with the value that leaves each unset and why it is theirs
    # (the request builder refuses them for another family with that reason).
    own_options: ClassVar[dict[str, tuple[object, str]]] = {}
    # generate/serve load options this family reads beyond dtype, -q and LoRAs.
    load_options: ClassVar[tuple[str, ...]] = ()
    # Named sizes of random-weight models it can build (nothing downloaded), e.g. tiny, mid, real.
    random_dims: ClassVar[tuple[str, ...]] = ()
    # The values of its own options that take a fixed set (the CLI's choices).
    option_choices: ClassVar[dict[str, tuple]] = {}
    # Options only some of its recipes read: option -> the recipes that read it.
    recipe_options: ClassVar[dict[str, tuple[str, ...]]] = {}
    # How long a prompt may be in its own tokens, as --help says it ("HiDream-O1 at most 2,048 of its
    # tokens"); :meth:`build_request` applies the rule (the shared builder bounds the characters).
    prompt_rule: ClassVar[str] = ""
    # The keys only its images record, with the kind each value must be (``hidream_mlx.images``'
    # kinds); the keys every image records are the shared schema's (``workflow/metadata.py``).
    metadata_fields: ClassVar[dict] = {}
    # Other families (by name) whose models may replay some of its recorded cases (HiDream-E1's
    # cases that need no E1 weights replay on its base, a HiDream-I1 pipeline).
    replay_models: ClassVar[tuple[str, ...]] = ()

    def recognises(self, arg: str) -> bool:
        """True when ``arg`` (a folder, a file or a repo id) is one of this family's models."""
        raise NotImplementedError

    def resolve(self, arg, options: Optional[dict] = None, allow_download: bool = True):
        """The source of ``arg``; ``options`` holds the load options (``llama``, ``base`` ...)."""
        raise NotImplementedError

    def build_request(self, model, options: dict, note: Note):
        """A checked request from option values (numbers already range-checked, prompt and
        ``negative_prompt`` checked as text; their length in tokens is this family's to check,
        :attr:`prompt_rule`); ``model`` is a source, an engine, or None (eval jobs with a recipe name)."""
        raise NotImplementedError

    def check_load(self, source, load: dict) -> None:
        """Refuse load options this family cannot honour for ``source`` (a dtype, ``-q`` on a
        converted folder), before anything loads; ``load`` as :meth:`load_engine` takes it."""

    def check_fits(self, source, requests: list, load: dict, extra_bytes: int = 0) -> None:
        """Refuse (MemoryError naming what to change) a run that cannot fit, before any weight loads."""
        raise NotImplementedError

    def load_engine(self, source, load: dict):
        """An engine for ``source``; ``load``: ``dtype``, ``bits``, ``loras`` and :attr:`load_options`."""
        raise NotImplementedError

    def random_engine(self, dims: str, layers: Optional[int], dtype: str, bits: Optional[int]):
        """An engine over random weights of named dims (:attr:`random_dims`; eval, info, bench)."""
        raise RequestError(f"--random-weights: not available for {self.title}")

    def bench(self, options: dict, log: Note) -> list[str]:
        """``bench``: time denoising steps on random weights of :attr:`random_dims`; the report's lines
        (stdout; ``log`` gets the progress)."""
        raise RequestError(f"bench: no random-weight benchmark for {self.title}")

    def resident_weights(self, source, load: dict) -> tuple[int, Optional[dict]]:
        """Load what stays resident while sampling, every weight evaluated (``bench --load-only``):
        its bytes and the quantization it runs with."""
        raise NotImplementedError

    def info_lines(self, arg, options: dict, note: Note) -> list[str]:
        """What ``info --model`` prints: weights per component and the predicted peak of a request."""
        raise NotImplementedError

    def recorded_settings(self, meta: dict) -> dict:
        """Option values that re-create the image whose metadata is ``meta`` (``--from-image``)."""
        raise NotImplementedError

    def describe_image(self, meta: dict) -> list[str]:
        """The family's line(s) of ``info IMAGE``."""
        raise NotImplementedError

    def convert(self, arg, output, recipe, options: dict, on_notice: Note, on_progress):
        """``quantize``: write a converted folder of ``arg``; returns the conversion's summary."""
        raise RequestError(f"quantize: not available for {self.title} models")

    def case_format(self, case) -> Optional[str]:
        """The format of a recorded case (an open npz file), or None when it is not this family's."""
        return None

    def replay(self, arg, case_path, options: dict) -> dict:
        """Replay a recorded case through this family's code: our outputs under the recorded keys
        (``arg``: a model of this family or of one in :attr:`replay_models`; ``options``: its
        :attr:`load_options`)."""
        raise ReplayError(f"replay: not available for {self.title} models")
