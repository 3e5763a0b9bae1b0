"""The official Dev-2604 precision: float32 weights and residual stream, bfloat16 matmuls."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURES, forward_cases, load_case

from hidream_mlx.families.o1.replay import predict_recorded
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.weights.precision import AutocastLinear, apply_precision, parse_dtype


def test_mixed_keeps_float32_weights_but_multiplies_in_bfloat16():
    linear = nn.Linear(64, 32)
    x = mx.random.normal((4, 64))
    auto = AutocastLinear(linear, mx.bfloat16)
    assert auto.weight.dtype == mx.float32 and parse_dtype("mixed") == mx.float32
    y = auto(x)
    assert y.dtype == mx.float32
    expected = (x.astype(mx.bfloat16) @ linear.weight.astype(mx.bfloat16).T + linear.bias.astype(mx.bfloat16))
    np.testing.assert_array_equal(np.array(y), np.array(expected.astype(mx.float32)))
    assert not np.array_equal(np.array(y), np.array(linear(x)))


def test_mixed_forward_matches_the_reference_to_bfloat16_accuracy():
    model = load_model(FIXTURES, dtype=mx.float32)
    apply_precision(model, "mixed")
    linears = [m for _, m in model.named_modules() if isinstance(m, AutocastLinear)]
    assert linears and not any(type(m) is nn.Linear for _, m in model.named_modules())
    case = forward_cases()[0]
    data = load_case("forward_t2i.npz")
    keys = ("input_ids", "position_ids", "token_types", "vinputs", "timestep")
    pred = predict_recorded(model, **{k: data[f"{case}.{k}"] for k in keys})
    ref = data[f"{case}.x_pred"]
    rel = np.abs(pred - ref).max() / np.abs(ref).max()
    assert 1e-5 < rel < 5e-2  # bfloat16 matmuls: not float32-exact, but close


def test_mixed_refuses_quantized_layers():
    model = nn.Sequential(nn.Linear(64, 64))
    nn.quantize(model, group_size=64, bits=8)
    with pytest.raises(ValueError, match="cannot be combined with quantization"):
        apply_precision(model, "mixed")


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="bfloat16, float32, mixed"):
        parse_dtype("float16")


def test_generate_runs_in_mixed_precision_and_records_it(tmp_path):
    from click.testing import CliRunner

    from hidream_mlx.cli import main
    from hidream_mlx.images import read_metadata

    base = ["generate", "--model", str(FIXTURES), "--prompt", "a fox", "--no-snap", "--width", "256", "--height",
            "256", "--seed", "1", "--recipe", "dev", "--steps", "2", "--dtype", "mixed"]
    result = CliRunner().invoke(main, [*base, "--output", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "m.png")["dtype"] == "mixed"
    refused = CliRunner().invoke(main, [*base, "-q", "8", "--output", str(tmp_path / "q.png")])
    assert refused.exit_code == 1 and "cannot be combined with -q" in refused.output
    assert not (tmp_path / "q.png").exists()
