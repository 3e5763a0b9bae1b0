"""The benchmark runner, and batched CFG giving what sequential CFG gives."""

import re

import mlx.core as mx
import numpy as np
from click.testing import CliRunner
from conftest import FIXTURES

from hidream_mlx.families.o1.bench import BenchConfig, run_bench
from hidream_mlx.cli.bench import bench
from hidream_mlx.memory import ru_maxrss_bytes
from hidream_mlx.memory import parameter_bytes
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.families.o1.patches import grid_size
from hidream_mlx.families.o1.sampling import Conditioning, encode_prompt_state, velocity
from hidream_mlx.families.o1.synthetic import synthetic_prompt_ids
from hidream_mlx.families.o1.transformer import stack_prefix_caches


def conditioning(model, size=256, cond_tokens=20, uncond_tokens=13):
    grid = grid_size(size, size)
    return Conditioning(encode_prompt_state(model, synthetic_prompt_ids(cond_tokens), grid),
                        encode_prompt_state(model, synthetic_prompt_ids(uncond_tokens, seed=1), grid))


def test_batched_cfg_equals_sequential_cfg(tiny_model):
    cond = conditioning(tiny_model)
    z = mx.random.normal((1, 64, 3072), key=mx.random.key(0)) * 8
    for t_model, sigma in ((0.1, 0.9), (0.6, 0.4)):
        seq = velocity(tiny_model, cond, z, t_model, sigma, guidance=5.0, batched=False)
        bat = velocity(tiny_model, cond, z, t_model, sigma, guidance=5.0, batched=True)
        np.testing.assert_allclose(np.array(bat), np.array(seq), rtol=1e-4, atol=1e-4)


def test_batched_cfg_handles_either_prompt_being_the_longer(tiny_model):
    cond = conditioning(tiny_model, cond_tokens=5, uncond_tokens=30)
    z = mx.random.normal((1, 64, 3072), key=mx.random.key(1))
    seq = velocity(tiny_model, cond, z, 0.5, 0.5, guidance=3.0, batched=False)
    bat = velocity(tiny_model, cond, z, 0.5, 0.5, guidance=3.0, batched=True)
    np.testing.assert_allclose(np.array(bat), np.array(seq), rtol=1e-4, atol=1e-4)


def test_stacked_caches_are_padded_and_masked(tiny_model):
    cond = conditioning(tiny_model, cond_tokens=20, uncond_tokens=13)
    cache, key_mask = stack_prefix_caches(cond.cond.cache, cond.uncond.cache)
    assert cache.length == 19 and cache.layers[0].keys.shape[0] == 2
    assert np.array(key_mask).sum(axis=1).tolist() == [19, 12]
    assert not np.array(cache.layers[0].keys)[1, :, 12:].any()  # padding is zeros, and masked out


def test_bench_runner_measures_each_variant_and_memory():
    result = run_bench(BenchConfig(dims="tiny", size=256, steps=2, repeats=2, guidance=3.0,
                                   compare_naive=True, compare_cfg=True))
    assert [v.name for v in result.variants] == ["cached", "cfg-batched", "naive"]
    assert all(len(v.step_times) == 4 and len(v.run_medians) == 2 for v in result.variants)
    assert result.generation_tokens == 65 and result.patches == 64
    assert result.weight_bytes > 0 and result.peak_rss >= result.baseline_rss and result.mlx_peak > 0


def test_bench_command_prints_the_cached_over_naive_ratio_last():
    result = CliRunner().invoke(bench, ["--dims", "tiny", "--size", "256", "--steps", "2", "--compare-naive",
                                        "--repeats", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    for expected in ("s/step", "generation 65 per pass", "text 100", "peak RSS", "MLX peak", "working set"):
        assert expected in result.stdout
    assert lines[-1].startswith("ratio cached/naive:")
    assert "(N+1)/(T+N) = 65/164" in lines[-1]


def test_bench_rejects_a_size_off_the_patch_grid():
    result = CliRunner().invoke(bench, ["--dims", "tiny", "--size", "300"])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


LOAD_LINE = re.compile(r"load (\d+\.\d) s, peak RSS (\d+\.\d\d) GiB, weights (\d+\.\d\d) GiB")


def load_only(*args):
    result = CliRunner().invoke(bench, ["--load-only", "--model", str(FIXTURES), *args])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def test_load_only_prints_time_peak_rss_and_weights_last():
    line = load_only()
    match = LOAD_LINE.fullmatch(line)
    assert match, line
    weights = parameter_bytes(load_model(FIXTURES, dtype=mx.bfloat16))  # bfloat16 by default, as generate
    assert match.group(3) == f"{weights / 2**30:.2f}"
    assert float(match.group(2)) * 2**30 >= ru_maxrss_bytes() - 2**30 / 200  # the high-water mark
    assert float(match.group(2)) > 0


def test_load_only_honours_dtype_and_quantization():
    floats = parameter_bytes(load_model(FIXTURES, dtype=mx.float32))
    assert LOAD_LINE.fullmatch(load_only("--dtype", "float32")).group(3) == f"{floats / 2**30:.2f}"
    q8 = parameter_bytes(load_model(FIXTURES, dtype=mx.bfloat16, bits=8))
    assert q8 < parameter_bytes(load_model(FIXTURES, dtype=mx.bfloat16))
    assert LOAD_LINE.fullmatch(load_only("-q", "8")).group(3) == f"{q8 / 2**30:.2f}"


def test_load_only_on_an_i1_pipeline_loads_its_transformer_and_vae():
    from i1_support import FIXTURES as I1_FIXTURES

    from hidream_mlx.harness.bench import run_load
    from hidream_mlx.families.i1.weights import load_transformer, load_vae

    def resident(bits=None):
        return (parameter_bytes(load_transformer(I1_FIXTURES / "transformer", mx.bfloat16, bits=bits))
                + parameter_bytes(load_vae(I1_FIXTURES / "vae", mx.bfloat16)))

    floats, q8 = run_load(str(I1_FIXTURES)), run_load(str(I1_FIXTURES), bits=8)
    assert floats.weight_bytes == resident() and floats.quantization is None
    assert q8.weight_bytes == resident(8) < floats.weight_bytes and q8.quantization["bits"] == 8
    line = CliRunner().invoke(bench, ["--load-only", "--model", str(I1_FIXTURES), "-q", "4"]).output
    assert LOAD_LINE.fullmatch(line.strip().splitlines()[-1])


def test_load_only_and_model_go_together():
    result = CliRunner().invoke(bench, ["--model", str(FIXTURES)])
    assert result.exit_code != 0 and "--load-only and --model go together" in str(result.exception)


SPREAD = r"(\d+\.\d+) {unit} \(min (\d+\.\d+) / max (\d+\.\d+)\)"
MOE_LINE = re.compile(r"moe {}, dense {}, ratio (\d+\.\d+)".format(SPREAD.format(unit="ms"), SPREAD.format(unit="ms")))


def test_o1_bench_prints_min_and_max_beside_every_median():
    result = CliRunner().invoke(bench, ["--dims", "tiny", "--size", "256", "--steps", "2", "--repeats", "2",
                                        "--guidance", "3", "--compare-cfg", "--compare-naive"])
    assert result.exit_code == 0, result.output
    for name in ("cached:", "cfg-batched:", "naive:"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        low, median, high = (float(v) for v in re.search(SPREAD.format(unit="s/step"), line).group(2, 1, 3))
        assert low <= median <= high


def test_i1_bench_times_steps_and_prints_the_routed_over_dense_ratio_last():
    from hidream_mlx.families.i1.bench import I1BenchConfig, run_bench_i1

    result = CliRunner().invoke(bench, ["--family", "i1", "--dims", "tiny", "--size", "128", "--steps", "1",
                                        "--repeats", "2", "--guidance", "4"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    match = MOE_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    moe, moe_low, moe_high, dense, dense_low, dense_high, ratio = (float(v) for v in match.groups())
    assert moe_low <= moe <= moe_high and dense_low <= dense <= dense_high
    assert abs(ratio - moe / dense) <= 0.01 * ratio + 0.05 / dense  # medians printed to 0.1 ms
    assert "image 64 + text 48 per row, batch 2" in result.stdout  # 128 px: 8x8 patches; CFG doubles the batch
    assert re.search(r"step: " + SPREAD.format(unit="s/step"), result.stdout)
    assert "routed vs dense" in result.stderr and "routed vs dense" not in result.stdout
    run = run_bench_i1(I1BenchConfig(dims="tiny", size=128, steps=2, repeats=2))
    assert len(run.step.step_times) == 4 and len(run.moe) == len(run.dense) == 10
    assert run.active_widths == (2, 256, 256) and run.batch == 1


def test_i1_bench_refuses_the_o1_only_options():
    for extra in (["--compare-naive"], ["--dims", "real"], ["--layers", "2"], ["--prompt-tokens", "100"]):
        result = CliRunner().invoke(bench, ["--family", "i1", "--dims", "tiny", *extra])
        assert result.exit_code != 0 and "not --family i1" in str(result.exception), extra
