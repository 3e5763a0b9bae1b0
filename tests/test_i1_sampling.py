"""HiDream-I1 schedules and samplers against the PyTorch pipeline runs ({full,dev,fast}_sampling.npz):
schedules, initial and per-step noise, teacher-forced steps, and free-running trajectories."""
import math

import mlx.core as mx
import numpy as np
import pytest

from hidream_mlx.families.i1.sampling import (RECIPES, GlobalTorchNoise, RecordedNoise, calculate_shift,
                                            guided_prediction, i1_schedule, initial_latents, make_sampler,
                                            sample, unipc_i1_schedule)
from hidream_mlx.families.i1.vae import to_uint8
from i1_support import TOL, conditioning, golden, max_abs, transformer, vae

CASES = ("full", "dev", "fast")


def case(name):
    return golden(f"{name}_sampling.npz")


@pytest.mark.parametrize("name", CASES)
def test_recipe_matches_the_recorded_run(name):
    c, r = case(name), RECIPES[name]
    assert (r.steps, r.guidance, r.shift) == (int(c["num_inference_steps"]), float(c["guidance_scale"]),
                                              float(c["shift"]))
    assert (r.guidance > 1) == bool(c["uses_cfg"])


@pytest.mark.parametrize("name", CASES)
def test_schedule_is_exact(name):
    c = case(name)
    s = i1_schedule(RECIPES[name], steps=len(c["timesteps"]))
    assert s.timesteps.dtype == c["timesteps"].dtype
    assert max_abs(s.timesteps, c["timesteps"]) < 1e-6 * 1000  # 1e-6 in sigma units
    assert max_abs(s.sigmas, c["sigmas"]) < 1e-6 and s.sigmas[-1] == 0
    batch = c["model_timesteps"].shape[1]
    assert np.array_equal(np.repeat(s.timesteps.astype(np.float32)[:, None], batch, 1),
                          c["model_timesteps"].astype(np.float32))


def test_official_unipc_variant_shifts_again_by_exp_mu():
    mu = calculate_shift(4096)
    assert abs(mu - 1.15) < 1e-12
    official = i1_schedule(RECIPES["full"], official_mu=True, max_seq=4096)
    assert list(official.timesteps[:5]) == [999, 993, 986, 980, 973]
    assert list(i1_schedule(RECIPES["full"]).timesteps[:5]) == [999, 993, 986, 979, 971]
    assert np.array_equal(official.timesteps, unipc_i1_schedule(50, 3.0, math.exp(mu)).timesteps)


@pytest.mark.parametrize("name", CASES)
def test_initial_latents_from_generator_seed(name):
    c = case(name)
    ours = initial_latents(int(c["generator_seed"]), c["init_latents"].shape)
    assert max_abs(ours, c["init_latents"]) < 1e-6


@pytest.mark.parametrize("name", ["dev", "fast"])
def test_step_noise_is_the_global_torch_rng(name):
    c = case(name)
    noise = GlobalTorchNoise(int(c["global_seed"]))
    steps = c["step_noise"]
    assert len(steps) == len(c["timesteps"]) - 1  # nothing is drawn on the last step
    for i in range(len(steps)):
        assert max_abs(noise(i, steps.shape[1:]), steps[i]) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_teacher_forced_sampler_steps(name):
    c, r = case(name), RECIPES[name]
    s = i1_schedule(r, steps=len(c["timesteps"]))
    sampler, n = make_sampler(r, s), len(c["timesteps"])
    state = sampler.start()
    for i in range(n):
        x = c["init_latents"] if i == 0 else c["latents"][i - 1]
        if sampler.needs_noise and i == n - 1:
            assert np.array_equal(c["latents"][i], x)  # the flash reference's last step is a no-op
            continue
        noise = mx.array(c["step_noise"][i]) if sampler.needs_noise else None
        y = sampler.step(state, i, mx.array(x), guided_prediction(mx.array(c["model_output"][i]), r.guidance), noise)
        assert max_abs(y, c["latents"][i]) < TOL, i


@pytest.mark.parametrize("name", CASES)
def test_teacher_forced_transformer_outputs(name):
    """Four spread steps (first and last included) in one batch, from the recorded latents."""
    c = case(name)
    cond = conditioning(c)
    inputs = np.concatenate([c["init_latents"][None], c["latents"][:-1]])  # [N, 1, C, h, w]
    steps = np.unique(np.linspace(0, len(inputs) - 1, 4).round().astype(int))
    inputs = inputs[steps]
    b = c["model_output"].shape[1]
    n = len(inputs)
    x = mx.array(np.repeat(inputs, b, axis=1).reshape(n * b, *inputs.shape[2:]))
    t = mx.array(c["model_timesteps"][steps].astype(np.float32).reshape(-1))
    tile = lambda a, axis: mx.concatenate([a] * n, axis=axis)
    out = transformer()(x, t, tile(cond.t5, 0), tile(cond.llama_stack, 1), tile(cond.pooled, 0))
    assert max_abs(out, c["model_output"][steps].reshape(out.shape)) < TOL


def free_run(name, noise_source):
    c, r = case(name), RECIPES[name]
    return sample(transformer(), conditioning(c), mx.array(c["init_latents"]), r,
                  i1_schedule(r, steps=len(c["timesteps"])), noise_source(c))


def relative(a, b):
    return max_abs(a, b) / float(np.abs(b).max())


@pytest.mark.parametrize("name,noise", [("full", None), ("fast", "recorded"),
                                        ("dev", "global_seed")])
def test_free_running_sampling_reaches_the_final_latents_and_image(name, noise):
    sources = {None: lambda c: None, "recorded": lambda c: RecordedNoise(c["step_noise"]),
               "global_seed": lambda c: GlobalTorchNoise(int(c["global_seed"]))}
    c = case(name)
    final = free_run(name, sources[noise])
    assert relative(final, c["final_latents"]) < 1e-3
    model = vae()
    assert max_abs(model.to_vae_space(final), c["vae_input"]) < 1e-3 * float(np.abs(c["vae_input"]).max())
    image = np.asarray(to_uint8(model.decode_latents(final)[0])).astype(int)
    diff = np.abs(image - c["image"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_flash_needs_a_noise_source():
    c = case("dev")
    with pytest.raises(ValueError, match="noise"):
        sample(transformer(), conditioning(c), mx.array(c["init_latents"]), RECIPES["dev"],
               i1_schedule(RECIPES["dev"], steps=3), None)
