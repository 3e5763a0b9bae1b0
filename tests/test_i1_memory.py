"""HiDream-I1 memory model: component sizes from headers at bf16/Q8/Q4, phase peaks, the fit check, info.

Sizes follow from the tiny pipeline's headers (never hard-coded shapes): loaded modules must
weigh exactly what the model predicts, quantized bytes must shrink by the affine format's ratio,
layers the group size cannot split must count as floats, and a run's peak is its largest phase.
"""

import importlib.util
import math
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from hidream_mlx import memory
from hidream_mlx.cli import main
from hidream_mlx.families.i1 import memory as i1_memory
from hidream_mlx.families.i1.encoder_common import quantize_linears
from hidream_mlx.families.i1.llama import load_llama
from hidream_mlx.families.i1.t5 import load_t5
from hidream_mlx.families.i1.weights import load_transformer, load_vae
from hidream_mlx.weights.loading import TensorInfo
from i1_support import FIXTURES

GROUP = 64


@pytest.fixture(scope="module")
def model_memory():
    return i1_memory.I1Memory.from_source(FIXTURES)


def test_float_sizes_are_the_headers_elements_at_the_load_dtype(model_memory):
    for name, weights in model_memory.weights.items():
        elements = sum(math.prod(info.shape) for info in weights.tensors.values())
        for dtype_bytes in (2, 4):
            size = weights.size(None, dtype_bytes)
            assert size.parameters == elements
            assert size.nbytes == elements * dtype_bytes, name


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_predicted_transformer_bytes_equal_what_the_loader_holds(model_memory, bits):
    model = load_transformer(FIXTURES / "transformer", mx.float32, lazy=False, bits=bits)
    assert memory.parameter_bytes(model) == model_memory.component_bytes("transformer", bits, 4)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_predicted_t5_and_llama_bytes_equal_the_quantized_encoders(model_memory, bits):
    for name, load in (("t5", load_t5), ("llama", load_llama)):
        model = load(FIXTURES / f"text_encoder_{3 if name == 't5' else 4}", mx.float32)
        if bits:
            quantize_linears(model, bits, GROUP)
        mx.eval(model.parameters())
        assert memory.parameter_bytes(model) == model_memory.component_bytes(name, bits, 4), name


def test_vae_and_clip_never_quantize(model_memory):
    vae = load_vae(FIXTURES / "vae", mx.float32, lazy=False)
    for bits in (None, 8, 4):
        assert model_memory.component_bytes("vae", bits, 4) == memory.parameter_bytes(vae)
        for clip in ("clip_l", "clip_g"):
            assert model_memory.component_bytes(clip, bits, 2) == model_memory.component_bytes(clip, None, 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bytes_shrink_by_the_affine_ratio_and_indivisible_layers_stay_float(model_memory, bits):
    for name in ("transformer", "t5", "llama"):
        weights = model_memory.weights[name]
        layers, kept = weights.plan(bits, GROUP)
        widths = weights.matrices()
        assert all(widths[p] % GROUP for p in kept) and all(layers[p] is None for p in kept)
        assert all(widths[p] % GROUP == 0 for p, s in layers.items() if s is not None)
        saved = 0
        for path, setting in layers.items():
            if setting is not None:
                n = math.prod(weights.tensors[f"{path}.weight"].shape)
                saved += 2 * n - (n * bits // 8 + n // GROUP * 2 * 2)
        assert weights.size(None, 2).nbytes - weights.size(bits, 2).nbytes == saved, name


def test_a_layer_the_group_size_cannot_split_counts_as_float():
    info = lambda shape: TensorInfo("t", Path("x.safetensors"), shape, "BF16")  # noqa: E731
    weights = i1_memory.Weights("enc", {"a.weight": info((128, 128)), "b.weight": info((128, 96)),
                                        "emb.weight": info((1000, 128))}, linears=frozenset({"a", "b"}))
    layers, kept = weights.plan(4, GROUP)
    assert kept == ["b"] and layers["a"].bits == 4 and "emb" not in layers
    expected = (128 * 128 // 2 + 128 * 128 // GROUP * 4) + 128 * 96 * 2 + 1000 * 128 * 2
    assert weights.size(4, 2).nbytes == expected


def test_the_run_peak_is_the_largest_phase(model_memory):
    for bits in (None, 8, 4):
        for fused in (True, False):
            p = i1_memory.phase_peaks(model_memory, bits, bits, 128, 128, True, 4, fused)
            assert p.whole == max(p.encode, p.sample, p.decode)
            assert p.sample >= p.load
            assert p.largest in ("encode", "sample", "decode")


def test_encode_phase_is_one_encoder_at_a_time_not_their_sum(model_memory):
    p = i1_memory.phase_peaks(model_memory, None, None, 128, 128, True, 4)
    sizes = {n: model_memory.component_bytes(n, None, 4) for n in i1_memory.ENCODERS}
    assert p.encode >= max(sizes.values()) and p.encode_by in sizes


def test_cfg_size_and_resident_transformer_raise_the_peaks(model_memory):
    cfg_t, vae_cfg = model_memory.transformer_cfg, model_memory.vae_cfg
    scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
    step = lambda size, batch: i1_memory.sampling_activations(cfg_t, 256, size, size, scale, batch, 2, False, 128)  # noqa: E731
    assert step(128, 2) == 2 * step(128, 1) and step(256, 2) > step(128, 2)
    one = i1_memory.phase_peaks(model_memory, None, None, 128, 128, False, 2)
    cfg = i1_memory.phase_peaks(model_memory, None, None, 128, 128, True, 2)
    large = i1_memory.phase_peaks(model_memory, None, None, 256, 256, True, 2)
    batch = i1_memory.phase_peaks(model_memory, None, None, 128, 128, True, 2, images=3)
    assert cfg.sample >= one.sample and cfg.encode > one.encode
    assert large.sample >= cfg.sample and large.decode > cfg.decode
    assert batch.decode - cfg.decode == model_memory.component_bytes("transformer", None, 2)


def test_fit_check_refuses_naming_the_phase_and_its_flags(monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"needs about .*\(its (encode|sample|decode) phase\).* offers .*--force"):
        i1_memory.check_fits_i1(FIXTURES, 4, None, None, 128, 128, cfg_pass=True)
    monkeypatch.setattr(memory, "machine_memory", lambda: 64 << 30)
    i1_memory.check_fits_i1(FIXTURES, 4, 8, 8, 128, 128, cfg_pass=True)


def test_info_on_an_i1_pipeline_prints_sizes_and_phase_peaks():
    result = CliRunner().invoke(main, ["info", "--model", str(FIXTURES), "--no-snap", "--width", "128",
                                       "--height", "128", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in ("computed", "float32", "Q8", "Q4", "encode (largest encoder:", "transformer load",
                     "sample", "VAE decode", "whole run", "on CPU", "machine:", "128x128"):
        assert expected in out
    params = sum(math.prod(i.shape) for i in i1_memory.I1Memory.from_source(FIXTURES).weights["transformer"]
                 .tensors.values())
    assert f"{params:,} params" in out


def test_info_lists_the_layers_kept_in_floats():
    weights = i1_memory.I1Memory.from_source(FIXTURES)
    kept = weights.kept_in_floats(8, 8)
    out = CliRunner().invoke(main, ["info", "--model", str(FIXTURES)]).output
    for component, paths in kept.items():
        assert f"{component} keeps {len(paths)} layer(s) in floats" in out and paths[0] in out
    if not kept:
        assert "none kept in floats" in out


def test_info_refuses_o1_quantization_flag_for_i1():
    result = CliRunner().invoke(main, ["info", "--model", str(FIXTURES), "-q", "4"])
    assert result.exit_code == 1 and "HiDream-I1" in result.output


@pytest.mark.parametrize("args", [["--model", str(FIXTURES), "--width", "1000000", "--height", "1000000"],
                                  ["--random-weights", "tiny", "--width", "1000000", "--height", "1000000"],
                                  ["--random-weights", "tiny", "--width", "8192", "--height", "8192"]])
def test_info_applies_size_limits_before_any_memory_advice(args):
    result = CliRunner().invoke(main, ["info", *args])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: --width")
    assert "-q" not in result.output and "fit" not in result.output


def test_bench_refuses_a_size_beyond_the_limits_before_allocating():
    result = CliRunner().invoke(main, ["bench", "--dims", "tiny", "--size", "8192"])
    assert result.exit_code == 1
    assert result.output == "error: --size: size 8192x8192 is 67,108,864 px, above the maximum of 4,300,000 px\n"


def _tool(name):
    path = Path(__file__).parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_released_sizes_from_real_size_sparse_headers(tmp_path):
    """17B parameters: about 34 GB in bf16 and about 10 GB at 4 bits, from headers alone."""
    out = tmp_path / "i1"
    _tool("make_sparse_i1_checkpoint").main([str(out), "--from", str(FIXTURES)])
    _tool("make_sparse_i1_encoders").main([str(out), "--from", str(FIXTURES)])
    m = i1_memory.I1Memory.from_source(out)
    transformer = m.weights["transformer"]
    assert 17.0e9 < transformer.size(None, 2).parameters < 17.2e9
    assert 33e9 < transformer.size(None, 2).nbytes < 35e9
    assert 9e9 < transformer.size(4, 2).nbytes < 11e9
    assert m.kept_in_floats(4, 4) == {}  # every released width divides by 64
    peaks = i1_memory.phase_peaks(m, 4, 4, 1024, 1024, True, 2, fused=True)
    assert peaks.whole == peaks.sample and peaks.encode_by == "llama"
    llama, t5 = m.component_bytes("llama", 4, 2), m.component_bytes("t5", 4, 2)
    assert llama < peaks.encode < llama + t5  # one encoder resident at a time
