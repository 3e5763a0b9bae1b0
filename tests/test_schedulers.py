"""Samplers and schedules, checked against the reference's recorded vectors."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from hidream_mlx.noise import TorchNoise
from hidream_mlx.schedulers import (
    DEFAULT_TIMESTEPS,
    FlashEulerSampler,
    FlowMatchEulerSampler,
    UniPCSampler,
    dev_timesteps,
    fixed_schedule,
    flow_match_schedule,
    pipeline_schedule,
    unipc_schedule,
)

SCHEDULERS = np.load(FIXTURES / "schedulers.npz")
SCHEDULE_KEY = re.compile(r"(flash|fm_euler|unipc)\.n(\d+)\.shift([\d.]+)\.timesteps$")
STEP_TOL = dict(rtol=1e-5, atol=1e-5)


def _meta(case: str) -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())["files"]["_meta"][case]


def _recorded_schedules():
    for key in SCHEDULERS.files:
        match = SCHEDULE_KEY.match(key)
        if match:
            yield pytest.param(match[1], int(match[2]), float(match[3]), key[: -len("timesteps")], id=key)


@pytest.mark.parametrize("kind, steps, shift, prefix", list(_recorded_schedules()))
def test_every_recorded_schedule_is_reproduced(kind, steps, shift, prefix):
    build = unipc_schedule if kind == "unipc" else flow_match_schedule
    schedule = build(steps, shift)
    expected_t = SCHEDULERS[prefix + "timesteps"]
    assert schedule.timesteps.dtype == expected_t.dtype
    if expected_t.dtype == np.int64:
        np.testing.assert_array_equal(schedule.timesteps, expected_t)
    else:
        np.testing.assert_allclose(schedule.timesteps, expected_t, rtol=0, atol=1e-6 * 1000)
    assert schedule.sigmas.dtype == np.float32
    np.testing.assert_allclose(schedule.sigmas, SCHEDULERS[prefix + "sigmas"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, args",
    [
        ("pipeline_flash", ("flash", 28, 1.0, DEFAULT_TIMESTEPS)),
        ("pipeline_flow_match", ("flow_match", 28, 1.0, DEFAULT_TIMESTEPS)),
        ("pipeline_default", ("default", 50, 3.0)),
    ],
)
def test_pipeline_schedules_match_build_scheduler(name, args):
    schedule = pipeline_schedule(*args)
    np.testing.assert_array_equal(schedule.timesteps, SCHEDULERS[name + ".timesteps"])
    assert schedule.timesteps.dtype == np.int64
    np.testing.assert_allclose(schedule.sigmas, SCHEDULERS[name + ".sigmas"], rtol=0, atol=1e-6)


def test_default_timesteps_are_the_recorded_dev_list():
    np.testing.assert_array_equal(DEFAULT_TIMESTEPS, np.load(FIXTURES / "dev_sampling.npz")["timesteps"])
    np.testing.assert_array_equal(DEFAULT_TIMESTEPS, SCHEDULERS["pipeline_flash.timesteps"])


def test_unknown_pipeline_scheduler_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipeline_schedule("ddim", 28, 1.0)


def test_model_times_and_velocity_sigmas_follow_the_sampling_semantics():
    for file, schedule in [
        ("dev_sampling.npz", pipeline_schedule("flash", 28, 1.0, DEFAULT_TIMESTEPS)),
        ("full_sampling.npz", pipeline_schedule("default", 50, 3.0)),
    ]:
        np.testing.assert_array_equal(schedule.model_times, np.load(FIXTURES / file)["model_t"])
    sigmas = fixed_schedule([999, 500, 1, 0]).velocity_sigmas
    np.testing.assert_allclose(sigmas, [0.999, 0.5, 0.001, 0.001], rtol=1e-7)


@pytest.mark.parametrize("clip", ["2.5", "0"])
def test_flash_step_matches_reference_with_and_without_noise_clipping(clip):
    p = f"flash_step.clip{clip}."
    sampler = FlashEulerSampler(fixed_schedule(DEFAULT_TIMESTEPS), 7.5, noise_clip_std=float(clip))
    out = sampler.step(sampler.start(), 5, SCHEDULERS[p + "sample"], SCHEDULERS[p + "model_output"], SCHEDULERS[p + "noise"])
    assert isinstance(out, mx.array) and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), SCHEDULERS[p + "prev_sample"], **STEP_TOL)


def test_flash_step_requires_noise():
    sampler = FlashEulerSampler(fixed_schedule(DEFAULT_TIMESTEPS), 7.5)
    assert sampler.needs_noise
    with pytest.raises(ValueError, match="noise"):
        sampler.step(None, 0, np.zeros((1, 1, 3072), np.float32), np.zeros((1, 1, 3072), np.float32))


def test_flash_noise_scale_runs_linearly_from_start_to_end():
    sampler = FlashEulerSampler(fixed_schedule(DEFAULT_TIMESTEPS[:5]), 8.0, 4.0)
    assert [sampler.s_noise(i) for i in range(5)] == [8.0, 7.0, 6.0, 5.0, 4.0]
    assert FlashEulerSampler(fixed_schedule([999]), 8.0, 4.0).s_noise(0) == 8.0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_flow_match_euler_steps_match_reference(index):
    p = f"fm_euler_step{index}."
    sampler = FlowMatchEulerSampler(fixed_schedule(DEFAULT_TIMESTEPS))
    assert not sampler.needs_noise
    out = sampler.step(sampler.start(), index, SCHEDULERS[p + "sample"], mx.array(SCHEDULERS[p + "model_output"]))
    np.testing.assert_allclose(np.array(out), SCHEDULERS[p + "prev_sample"], **STEP_TOL)


def _run_unipc(run: str, sampler: UniPCSampler):
    """Feed the recorded model outputs; return samples, x0 estimates, orders, corrector flags."""
    state, sample = sampler.start(), mx.array(SCHEDULERS[run + ".sample0"])
    samples, x0s, orders, corrected = [], [], [], []
    for i, model_output in enumerate(SCHEDULERS[run + ".model_outputs"]):
        sample = sampler.step(state, i, sample, model_output)
        samples.append(np.array(sample))
        x0s.append(np.array(state.x0))
        orders.append(state.order)
        corrected.append(int(state.corrected))
    return np.stack(samples), np.stack(x0s), orders, corrected


@pytest.mark.parametrize("run", ["unipc_ms_n50", "unipc_ms_n6"])
def test_unipc_multistep_matches_reference(run):
    schedule = unipc_schedule(len(SCHEDULERS[run + ".timesteps"]), 3.0)
    np.testing.assert_array_equal(schedule.timesteps, SCHEDULERS[run + ".timesteps"])
    samples, x0s, orders, corrected = _run_unipc(run, UniPCSampler(schedule))
    assert orders == SCHEDULERS[run + ".orders"].tolist()
    assert corrected == SCHEDULERS[run + ".corrector_used"].tolist()
    np.testing.assert_allclose(x0s, SCHEDULERS[run + ".x0_preds"], **STEP_TOL)
    np.testing.assert_allclose(samples, SCHEDULERS[run + ".prev_samples"], **STEP_TOL)


def test_unipc_final_step_to_sigma_zero_returns_the_x0_estimate_without_nan():
    sampler = UniPCSampler(unipc_schedule(6, 3.0))
    samples, x0s, _, _ = _run_unipc("unipc_ms_n6", sampler)
    assert sampler.schedule.sigmas[-1] == 0
    assert np.isfinite(samples).all()
    np.testing.assert_array_equal(samples[-1], x0s[-1])


def test_a_sampler_runs_twice_with_identical_results():
    sampler = UniPCSampler(unipc_schedule(6, 3.0))
    first, second = _run_unipc("unipc_ms_n6", sampler), _run_unipc("unipc_ms_n6", sampler)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[2:] == second[2:]


def test_flash_sampler_reproduces_the_dev_run_teacher_forced():
    """Dev recipe: recorded x_pred per step, our noise stream; every z[i+1] within 2e-4."""
    meta = _meta("dev_sampling")
    run = np.load(FIXTURES / "dev_sampling.npz")
    schedule = pipeline_schedule("flash", meta["num_steps"], meta["shift"], DEFAULT_TIMESTEPS)
    sampler = FlashEulerSampler(schedule, meta["noise_scale_start"], meta["noise_scale_end"], meta["noise_clip_std"])
    np.testing.assert_allclose([sampler.s_noise(i) for i in range(len(schedule))], run["s_noise"])
    for _ in range(2):  # twice: nothing inside the sampler may carry over between runs
        noise, state = TorchNoise(meta["seed"]), sampler.start()
        for i in range(len(schedule)):
            z = mx.array(run["z"][i])
            model_output = -(mx.array(run["x_pred"][i]) - z) / float(schedule.velocity_sigmas[i])
            z_next = sampler.step(state, i, z, model_output, noise.step(z.shape))
            np.testing.assert_allclose(np.array(z_next), run["z"][i + 1], rtol=0, atol=2e-4)


def test_unipc_sampler_reproduces_the_first_full_steps_teacher_forced():
    run = np.load(FIXTURES / "full_sampling.npz")
    kept = run["keep_steps"].tolist()
    sampler = UniPCSampler(pipeline_schedule("default", 50, 3.0))
    state, z = sampler.start(), run["z"][0]
    for i in range(3):
        assert kept[i] == i
        z = sampler.step(state, i, z, run["model_output_kept"][i])
        np.testing.assert_allclose(np.array(z), run["z"][i + 1], rtol=0, atol=2e-4)


def test_flow_match_sampler_reproduces_the_edit_run_teacher_forced():
    run = np.load(FIXTURES / "flow_match_sampling.npz")
    schedule = pipeline_schedule("flow_match", 28, 1.0, DEFAULT_TIMESTEPS)
    sampler = FlowMatchEulerSampler(schedule)
    for i, x_pred in enumerate(run["x_pred_first3"]):
        model_output = -(x_pred - run["z"][i]) / schedule.velocity_sigmas[i]
        np.testing.assert_allclose(model_output, run["model_output_first3"][i], **STEP_TOL)
        z_next = sampler.step(sampler.start(), i, run["z"][i], model_output)
        np.testing.assert_allclose(np.array(z_next), run["z"][i + 1], rtol=0, atol=2e-4)


def test_dev_timesteps_spread_evenly_and_keep_the_first():
    assert dev_timesteps() == DEFAULT_TIMESTEPS
    assert dev_timesteps(1) == (999,)
    assert dev_timesteps(2) == (999, 8)
    indices = np.round(np.linspace(0, 27, 8)).astype(int)
    assert dev_timesteps(8) == tuple(DEFAULT_TIMESTEPS[i] for i in indices)
    for n in range(1, 29):
        chosen = dev_timesteps(n)
        assert len(chosen) == n and chosen[0] == 999
        assert list(chosen) == sorted(set(chosen), reverse=True)
        assert set(chosen) <= set(DEFAULT_TIMESTEPS)


@pytest.mark.parametrize("steps", [0, 29])
def test_dev_timesteps_reject_counts_outside_the_distilled_list(steps):
    with pytest.raises(ValueError, match="1 to 28"):
        dev_timesteps(steps)
