"""Memory prediction: what the weights take, what a request needs, refusing what cannot fit."""

import warnings

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from click.testing import CliRunner
from conftest import FIXTURES

from hidream_mlx import memory
from hidream_mlx.families.o1 import memory as o1_memory
from hidream_mlx.cli.info import info
from hidream_mlx.weights.loading import checkpoint_index
from hidream_mlx.families.o1.synthetic import synthetic_config

REAL = synthetic_config("real").text


def test_prediction_grows_with_size_and_with_cfg(tiny_model):
    sizes = [(256, 256), (512, 512), (1024, 1024), (2048, 2048)]
    for cfg_pass in (False, True):
        peaks = [o1_memory.predicted_peak(tiny_model, w, h, cfg_pass) for w, h in sizes]
        assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    for w, h in sizes:
        assert o1_memory.predicted_peak(tiny_model, w, h, True) > o1_memory.predicted_peak(tiny_model, w, h, False)


def test_working_set_grows_with_size_and_cfg_for_the_real_architecture():
    small = o1_memory.working_set(REAL, 1024, 1024, fused_attention=False).total
    large = o1_memory.working_set(REAL, 2048, 2048, fused_attention=False).total
    with_cfg = o1_memory.working_set(REAL, 1024, 1024, cfg_pass=True, fused_attention=False).total
    assert small < with_cfg
    assert large > 4 * small  # the materialized score matrix grows with the square of the patch count


def test_fused_attention_drops_only_the_score_matrix():
    cpu = o1_memory.working_set(REAL, 2048, 2048, fused_attention=False)
    metal = o1_memory.working_set(REAL, 2048, 2048, fused_attention=True)
    assert metal.attention_scores == 0 < cpu.attention_scores
    assert cpu.total - metal.total == cpu.attention_scores


def test_quantized_bytes_are_bits_per_weight_plus_a_scale_and_bias_per_group_of_64():
    n = 4096 * 4096
    assert memory.quantized_bytes(n, 8) == n + (n // 64) * 4
    assert memory.quantized_bytes(n, 4) == n // 2 + (n // 64) * 4


def test_quantizing_shrinks_only_the_decoder_linears():
    shapes = [("language_model.layers.0.mlp.up_proj.weight", (128, 64)),
              ("language_model.layers.0.input_layernorm.weight", (64,)),
              ("language_model.embed_tokens.weight", (1000, 64)),
              ("x_embedder.proj1.weight", (16, 3072))]
    plain = o1_memory.weight_sizes(shapes, dtype_bytes=2)
    q4 = o1_memory.weight_sizes(shapes, dtype_bytes=2, bits=4)
    assert q4["language_model.layers"].nbytes == 128 * 64 // 2 + 128 * 64 // 64 * 4 + 64 * 2
    assert q4["language_model.layers"].parameters == plain["language_model.layers"].parameters
    for unchanged in ("language_model.embed_tokens", "x_embedder"):
        assert q4[unchanged].nbytes == plain[unchanged].nbytes


def test_checkpoint_sizes_match_the_loaded_model_without_loading_it(tiny_model):
    loaded, skipped = o1_memory.checkpoint_sizes(FIXTURES, dtype_bytes=4)
    by_component = {}
    for name, a in tree_flatten(tiny_model.parameters()):
        by_component[memory.component_of(name)] = by_component.get(memory.component_of(name), 0) + a.nbytes
    assert {k: v.nbytes for k, v in loaded.items()} == by_component
    assert sum(v.nbytes for v in loaded.values()) == memory.parameter_bytes(tiny_model)
    assert "visual" in skipped  # the vision tower is reported, never loaded for text-to-image
    assert len(checkpoint_index(FIXTURES)) > 0


def test_check_fits_refuses_a_machine_too_small_with_a_suggestion(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"needs about .* offers .*-q 6 or -q 4.*smaller size.*--force"):
        o1_memory.check_fits_folder(FIXTURES, 4, None, 1024, 1024, cfg_pass=True)


def test_check_fits_accepts_a_machine_large_enough(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda: 64 << 30)
    o1_memory.check_fits_folder(FIXTURES, 4, None, 1024, 1024, cfg_pass=True)


def test_wired_limit_does_nothing_without_metal(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "metal_device_info", lambda: None)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("no wired limit without Metal"))
    with memory.wired_limit(tiny_model):
        pass


def test_wired_limit_raises_to_the_recommended_working_set_then_restores(tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "metal_device_info", lambda: {"max_recommended_working_set_size": 1 << 30})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 123)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with memory.wired_limit(tiny_model):
            assert calls == [1 << 30]
    assert calls == [1 << 30, 123]


def test_wired_limit_warns_when_the_model_exceeds_the_recommended_working_set(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "metal_device_info", lambda: {"max_recommended_working_set_size": 1 << 20})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: 0)
    monkeypatch.setattr(mx, "synchronize", lambda *a: None)
    with pytest.warns(UserWarning, match="recommends"):
        with memory.wired_limit(tiny_model):
            pass


def test_info_reports_components_prediction_and_machine_for_the_fixture_folder():
    result = CliRunner().invoke(info, ["--model", str(FIXTURES), "--width", "512", "--height", "512",
                                       "--guidance", "5", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in ("language_model.embed_tokens", "language_model.layers", "x_embedder", "t_embedder1",
                     "final_layer2", "never loaded", "visual", "512x512, guidance 5 (2 passes)",
                     "predicted peak on CPU", "predicted peak on Metal", "machine:"):
        assert expected in out
    total = sum(v.nbytes for v in o1_memory.checkpoint_sizes(FIXTURES, 4)[0].values())
    assert "total: " in out and memory.format_bytes(total) in out


def test_info_with_quantization_shows_smaller_decoder_weights():
    plain = CliRunner().invoke(info, ["--random-weights", "real"])
    q4 = CliRunner().invoke(info, ["--random-weights", "real", "-q", "4"])
    assert plain.exit_code == q4.exit_code == 0
    assert "Q4" in q4.output and "6,946,071,552 params" in q4.output
    assert plain.output != q4.output


def test_info_needs_exactly_one_model_source():
    result = CliRunner().invoke(info, [])
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A folder of mixed widths: every down_proj at 8 bits, the other decoder linears at 4."""
    from hidream_mlx.families.o1.convert import convert
    from hidream_mlx.quant.recipes import get_quant_recipe

    out = tmp_path_factory.mktemp("q") / "q4-down8"
    return convert(str(FIXTURES), out, get_quant_recipe("q4-down8"), bits=4, include_vision=False).output


@pytest.mark.parametrize("dtype, dtype_bytes", [(mx.bfloat16, 2), (mx.float32, 4)])
def test_checkpoint_sizes_of_a_quantized_folder_match_what_loads(mixed_folder, dtype, dtype_bytes):
    from hidream_mlx.families.o1.loading import load_model

    model = load_model(mixed_folder, dtype=dtype)
    loaded, skipped = o1_memory.checkpoint_sizes(mixed_folder, dtype_bytes=dtype_bytes)
    by_component = {}
    for name, a in tree_flatten(model.parameters()):
        by_component[memory.component_of(name)] = by_component.get(memory.component_of(name), 0) + a.nbytes
    assert {k: v.nbytes for k, v in loaded.items()} == by_component
    assert "visual" not in skipped  # converted with --no-vision
    # Packed weights count as the parameters they hold: the same count as the float checkpoint.
    float_sizes, _ = o1_memory.checkpoint_sizes(FIXTURES, dtype_bytes=dtype_bytes)
    assert {k: v.parameters for k, v in loaded.items()} == {k: v.parameters for k, v in float_sizes.items()}
    assert loaded["language_model.layers"].nbytes < float_sizes["language_model.layers"].nbytes


def test_info_on_a_quantized_folder_predicts_from_its_stored_sizes(mixed_folder):
    result = CliRunner().invoke(info, ["--model", str(mixed_folder), "--width", "256", "--height", "256"])
    assert result.exit_code == 0, result.output
    sizes = o1_memory.checkpoint_sizes(mixed_folder, 2)[0].values()
    total, total_params = sum(v.nbytes for v in sizes), sum(v.parameters for v in sizes)
    assert f"total: {total_params:,} params, {memory.format_bytes(total)}" in result.output
