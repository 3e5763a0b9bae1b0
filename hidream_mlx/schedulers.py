"""The three samplers of the official pipeline: flash Euler (Dev), flow-match Euler, flow UniPC.

A :class:`Schedule` is a frozen pair (timesteps, sigmas). A sampler is a frozen description of
the update rule; ``sampler.start()`` returns a fresh per-run state and
``sampler.step(state, i, sample, model_output, noise=None)`` returns the next sample, so one
sampler can run any number of images. ``model_output`` is the flow velocity the reference
passes to ``scheduler.step``: ``-(x_pred - z) / sigma`` (see ``Schedule.velocity_sigmas``).

Schedules are computed with the same float32/float64 mix as the reference (diffusers and the
official ``fm_solvers_unipc``), because the sampling loop feeds ``timesteps`` to the model and
tiny sigma differences would otherwise show up in the images.

The UniPC update is the same in the official ``FlowUniPCMultistepScheduler`` and in diffusers'
``UniPCMultistepScheduler`` with flow sigmas (bh2, order 2, x0 prediction); only their schedules
differ (:func:`unipc_schedule` shifts twice, :func:`unipc_flow_sigmas_schedule` once), so both
run through :class:`UniPCSampler`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
# Smallest sigma used to turn x_pred into a velocity (the reference's T_EPS).
MIN_VELOCITY_SIGMA = 0.001
# The 28 timesteps the Dev checkpoints were distilled on (the reference's DEFAULT_TIMESTEPS).
DEFAULT_TIMESTEPS = (
    999, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737,
    707, 675, 640, 602, 560, 515, 464, 409, 347, 278, 199, 110, 8,
)  # fmt: skip

_F32 = np.float32


@dataclass(frozen=True)
class Schedule:
    """Per-step timesteps (int64 or float32, as the reference has them) and float32 sigmas
    with a trailing 0, so ``sigmas[i + 1]`` is where step ``i`` lands."""

    timesteps: np.ndarray
    sigmas: np.ndarray

    def __post_init__(self):
        # Shared by every run of a sampler, so nothing may change it in place.
        self.timesteps.setflags(write=False)
        self.sigmas.setflags(write=False)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def model_times(self) -> np.ndarray:
        """The time the model is conditioned on at each step: ``1 - t/1000`` (float32)."""
        return _F32(1.0) - self.timesteps.astype(_F32) / _F32(NUM_TRAIN_TIMESTEPS)

    @property
    def velocity_sigmas(self) -> np.ndarray:
        """The sigma that turns x_pred into a velocity: ``max(t/1000, 0.001)``. For UniPC this
        differs slightly from ``sigmas`` (int timesteps); the reference does the same."""
        sigma = self.timesteps.astype(_F32) / _F32(NUM_TRAIN_TIMESTEPS)
        return np.maximum(sigma, _F32(MIN_VELOCITY_SIGMA))


def _shift(sigmas, shift: float):
    """Resolution-independent timestep shift; keeps the dtype of ``sigmas``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_schedule(num_steps: int, shift: float = 1.0) -> Schedule:
    """diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (also the flash scheduler's).

    As in diffusers the shift is applied twice: once to the training sigmas (which sets
    sigma_min) and again to the inference sigmas spread between sigma_max and sigma_min.
    """
    train = np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=_F32)[::-1]
    train_sigmas = _shift(train / _F32(NUM_TRAIN_TIMESTEPS), _F32(shift))
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = _shift(sigmas / NUM_TRAIN_TIMESTEPS, shift).astype(_F32)
    timesteps = sigmas * _F32(NUM_TRAIN_TIMESTEPS)
    return Schedule(timesteps, np.append(sigmas, _F32(0.0)))


def unipc_schedule(num_steps: int, shift: float = 1.0) -> Schedule:
    """The official ``FlowUniPCMultistepScheduler.set_timesteps``: float sigmas, int64 timesteps
    (``sigma * 1000`` truncated), final sigma 0. The shift is again applied twice."""
    train_sigmas = (1.0 - np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1]).astype(_F32)
    train_sigmas = _shift(train_sigmas, _F32(shift))
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = _shift(np.linspace(sigma_max, sigma_min, num_steps + 1)[:-1], shift)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return Schedule(timesteps, np.append(sigmas, 0.0).astype(_F32))


def unipc_flow_sigmas_schedule(num_steps: int, flow_shift: float) -> Schedule:
    """diffusers' ``UniPCMultistepScheduler.set_timesteps(num_steps)`` with ``use_flow_sigmas``
    and no ``mu``: one shift only (unlike :func:`unipc_schedule`).

    ``s = linspace(1, 1/1000, N + 1)[:-1]`` shifted by ``flow_shift``; a first sigma of exactly 1
    is lowered by 1e-6 (the log-SNR of sigma 1 would be -inf); timesteps ``int64(s * 1000)``
    (truncated), sigmas float32 with a final 0. Computed in float64 as diffusers does.
    """
    sigmas = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1]
    sigmas = _shift(sigmas, float(flow_shift))
    if sigmas[0] == 1.0:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return Schedule(timesteps, np.append(sigmas, 0.0).astype(_F32))


# What UniPCSampler implements, as diffusers' UniPCMultistepScheduler config keys; other values
# of these keys change the update rule or the schedule and are refused.
UNIPC_FIXED_SETTINGS = {
    "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "final_sigmas_type": "zero",
    "thresholding": False, "disable_corrector": [], "solver_p": None, "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "sigma_min": None, "sigma_max": None, "shift_terminal": None,
}


def unipc_settings_problem(config: dict) -> Optional[str]:
    """None when a diffusers ``UniPCMultistepScheduler`` config is what :class:`UniPCSampler`
    with :func:`unipc_flow_sigmas_schedule` runs; else the first setting that differs, as
    ``key = value (expected ...)``. Keys the config leaves out take diffusers' defaults, which
    are the expected values except ``use_flow_sigmas`` (off by default, so it must be given)."""
    defaults = {"use_flow_sigmas": False, "prediction_type": "epsilon"}
    for key, expected in UNIPC_FIXED_SETTINGS.items():
        value = config.get(key, defaults.get(key, expected))
        if value != expected:
            return f"{key} = {json.dumps(value)} (expected {json.dumps(expected)})"
    shift = config.get("flow_shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
        return f"flow_shift = {json.dumps(shift)} (expected a positive number)"
    return None


def fixed_schedule(timesteps) -> Schedule:
    """A given list of integer timesteps (the pipeline's ``timesteps_list`` override):
    sigmas = t/1000 with a trailing 0, whatever the scheduler."""
    steps = np.asarray(timesteps, dtype=np.int64)
    return Schedule(steps, np.append(steps / NUM_TRAIN_TIMESTEPS, 0.0).astype(_F32))


def dev_timesteps(num_steps: int = len(DEFAULT_TIMESTEPS)) -> tuple[int, ...]:
    """``num_steps`` of the 28 distilled Dev timesteps, evenly spread.

    Rule: take indices ``round(linspace(0, 27, num_steps))`` (numpy rounding, half to even)
    of DEFAULT_TIMESTEPS. The first timestep (999) is always kept; for two or more steps the
    last one (8) is too, and 28 steps give the full official list. The Dev model only knows
    these timesteps, so asking for more than 28 is an error.
    """
    total = len(DEFAULT_TIMESTEPS)
    if not 1 <= num_steps <= total:
        raise ValueError(f"the Dev recipe runs 1 to {total} steps, got {num_steps}")
    indices = np.round(np.linspace(0, total - 1, num_steps)).astype(np.int64)
    return tuple(DEFAULT_TIMESTEPS[i] for i in indices)


def pipeline_schedule(scheduler: str, num_steps: int, shift: float, timesteps=None) -> Schedule:
    """The reference's ``build_scheduler``: ``scheduler`` is "flash", "flow_match" or "default"
    (UniPC); an explicit ``timesteps`` list overrides the computed schedule."""
    if scheduler not in ("flash", "flow_match", "default"):
        raise ValueError(f"unknown scheduler {scheduler!r}; choose flash, flow_match or default")
    if timesteps is not None:
        return fixed_schedule(timesteps)
    if scheduler == "default":
        return unipc_schedule(num_steps, shift)
    return flow_match_schedule(num_steps, shift)


# --- starting from an image (image-to-image, inpainting) ----------------------------------------

def steps_to_run(steps: int, strength: float) -> int:
    """How many of a schedule's ``steps`` a run of ``strength`` (0 < strength <= 1) takes: the
    last ``int(steps * strength)``, the share diffusers' image-to-image pipelines run."""
    return min(int(steps * strength), steps)


def start_step(steps: int, strength: float) -> int:
    """The index of the first step that runs (``set_begin_index`` in diffusers' schedulers)."""
    return steps - steps_to_run(steps, strength)


def smallest_strength(steps: int) -> float:
    """The smallest strength, in thousandths, that runs at least one of ``steps``: what a refusal
    of a strength that runs none suggests (``1 / steps`` itself can round to none: 49 * (1/49) < 1)."""
    thousandths = math.ceil(1000 / steps)
    while steps_to_run(steps, thousandths / 1000) < 1:
        thousandths += 1
    return thousandths / 1000


def noised(clean, noise, sigma: float):
    """A clean sample brought to noise level ``sigma`` of a flow: ``sigma * noise + (1 - sigma) *
    clean`` (diffusers' ``scale_noise``). ``noise`` carries the sampler's own scale; at sigma 0 the
    result is ``clean`` exactly."""
    sigma = float(sigma)
    return sigma * noise + (1.0 - sigma) * clean


def _as_f32(x) -> mx.array:
    return x.astype(mx.float32) if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=_F32))


@dataclass(frozen=True)
class FlowMatchEulerSampler:
    """diffusers' flow-match Euler: ``z + (sigma_{i+1} - sigma_i) * model_output``. No noise."""

    schedule: Schedule
    needs_noise = False

    def start(self) -> None:
        return None

    def step(self, state, i: int, sample, model_output, noise=None) -> mx.array:
        dt = float(self.schedule.sigmas[i + 1] - self.schedule.sigmas[i])
        return _as_f32(sample) + dt * _as_f32(model_output)


@dataclass(frozen=True)
class FlashEulerSampler:
    """The Dev ("flash") sampler: jump to the x0 estimate, then re-noise to ``sigma_{i+1}``
    with fresh noise scaled by ``s_noise`` (linear from ``noise_scale_start`` to
    ``noise_scale_end`` over the run) and, if ``noise_clip_std`` > 0, clipped at
    ``noise_clip_std`` standard deviations. Noise is needed at every step, the last too:
    the reference draws it there as well, which keeps the generator stream aligned."""

    schedule: Schedule
    noise_scale_start: float
    noise_scale_end: Optional[float] = None
    noise_clip_std: float = 0.0
    needs_noise = True

    def start(self) -> None:
        return None

    def s_noise(self, i: int) -> float:
        end = self.noise_scale_start if self.noise_scale_end is None else self.noise_scale_end
        steps = len(self.schedule)
        if steps <= 1:
            return self.noise_scale_start
        return self.noise_scale_start + (end - self.noise_scale_start) * i / (steps - 1)

    def step(self, state, i: int, sample, model_output, noise=None) -> mx.array:
        if noise is None:
            raise ValueError("the flash sampler needs fresh noise at every step")
        sigma, sigma_next = self.schedule.sigmas[i], self.schedule.sigmas[i + 1]
        denoised = _as_f32(sample) - _as_f32(model_output) * float(sigma)
        if self.noise_clip_std > 0:
            # torch takes the unbiased std with a double accumulator and rounds it to float32.
            # A float32 reduction is ~1e-6 off, which moves the clip limit visibly, so this is
            # done on the host; the noise does not depend on the model, so nothing waits on it.
            std = _F32(np.std(np.asarray(noise), ddof=1, dtype=np.float64))
            limit = float(_F32(self.noise_clip_std * float(std)))
            noise = mx.clip(_as_f32(noise), -limit, limit)
        noise = _as_f32(noise)
        keep = float(_F32(1.0) - sigma_next)
        return float(sigma_next) * noise * self.s_noise(i) + keep * denoised


@dataclass
class UniPCState:
    """One UniPC run: the last two x0 estimates (oldest first), the sample before the last
    predictor, and what the last step did (``order``, ``corrected``) for inspection."""

    x0_history: list = field(default_factory=list)
    last_sample: Optional[mx.array] = None
    order: int = 0
    corrected: bool = False

    @property
    def x0(self) -> Optional[mx.array]:
        """The latest x0 estimate ``sample - sigma * model_output``."""
        return self.x0_history[-1] if self.x0_history else None


def _log_snr(sigma) -> _F32:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma, in float32 like the reference."""
    sigma = _F32(sigma)
    return np.log(_F32(1.0) - sigma) - np.log(sigma)


@dataclass(frozen=True)
class UniPCSampler:
    """Flow UniPC multistep, fixed to the official settings: bh2, solver order 2, predict x0,
    lower order at the final step, final sigma 0, no disabled corrector steps.

    Each step: x0 = sample - sigma_i * model_output; the UniC corrector refines the incoming
    sample with that x0 (from the run's second step on); then the UniP predictor moves to
    sigma_{i+1} using the last one or two x0 estimates (order 1 at the run's first step and at the
    schedule's last). A run started mid-schedule (image-to-image) has no history yet, so it
    starts at first order, as diffusers' multistep schedulers count ``lower_order_nums`` per run."""

    schedule: Schedule
    needs_noise = False
    solver_order = 2

    def start(self) -> UniPCState:
        return UniPCState()

    def step(self, state: UniPCState, i: int, sample, model_output, noise=None) -> mx.array:
        sigmas = self.schedule.sigmas
        sample = _as_f32(sample)
        x0 = sample - float(sigmas[i]) * _as_f32(model_output)

        state.corrected = state.last_sample is not None and i > 0
        if state.corrected:
            sample = self._correct(i, state, x0)

        state.x0_history = (state.x0_history + [x0])[-self.solver_order:]
        # The run's own history bounds the order (not the step index): one x0 after its first step.
        state.order = min(self.solver_order, len(self.schedule) - i, len(state.x0_history))
        state.last_sample = sample
        return self._predict(i, sample, state.x0_history, state.order)

    def _coefficients(self, sigma_from, sigma_to):
        """h, alpha_to, and B(h) = expm1(-h) of the bh2 variant (float32 scalars)."""
        h = _log_snr(sigma_to) - _log_snr(sigma_from)
        return h, _F32(1.0) - _F32(sigma_to), np.expm1(-h)

    def _predict(self, i: int, sample: mx.array, history: list, order: int) -> mx.array:
        sigmas = self.schedule.sigmas
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        x0 = history[-1]
        if sigma_to == 0:
            # lambda = +inf, expm1(-inf) = -1: the order-1 update reduces to exactly x0.
            return x0
        h, alpha_to, b_h = self._coefficients(sigma_from, sigma_to)
        result = float(sigma_to / sigma_from) * sample - float(alpha_to * b_h) * x0
        if order == 2:
            rk = (_log_snr(sigmas[i - 1]) - _log_snr(sigma_from)) / h
            d1 = (history[-2] - x0) / float(rk)
            # Order-2 UniP uses the fixed weight rho = 1/2.
            result = result - float(alpha_to * b_h) * (0.5 * d1)
        return result

    def _correct(self, i: int, state: UniPCState, x0_new: mx.array) -> mx.array:
        sigmas = self.schedule.sigmas
        sigma_from, sigma_to = sigmas[i - 1], sigmas[i]
        h, alpha_to, b_h = self._coefficients(sigma_from, sigma_to)
        x0_prev = state.x0_history[-1]
        base = float(sigma_to / sigma_from) * state.last_sample - float(alpha_to * b_h) * x0_prev
        d1_t = x0_new - x0_prev
        if state.order == 1:
            return base - float(alpha_to * b_h) * (0.5 * d1_t)
        rk = (_log_snr(sigmas[i - 2]) - _log_snr(sigma_from)) / h
        rhos = self._corrector_weights(-h, b_h, rk)
        d1 = (state.x0_history[-2] - x0_prev) / float(rk)
        return base - float(alpha_to * b_h) * (float(rhos[0]) * d1 + float(rhos[1]) * d1_t)

    @staticmethod
    def _corrector_weights(hh, b_h, rk) -> np.ndarray:
        """Solve the order-2 UniC system R rho = b, R = [[1, 1], [rk, 1]],
        b_k = k! * phi_{k+1}(hh) * hh / B(h) (phi as in the UniPC paper), in float32."""
        phi = np.expm1(hh) / hh - _F32(1.0)
        b1 = phi / b_h
        phi = phi / hh - _F32(0.5)
        b2 = phi * _F32(2.0) / b_h
        matrix = np.array([[1.0, 1.0], [rk, 1.0]], dtype=_F32)
        return np.linalg.solve(matrix, np.array([b1, b2], dtype=_F32))
