"""HiDream-E1 memory from headers alone: at the official 1024x1024 budget E1.1 samples a batch of 3
rows of 8192 padded image tokens (twice I1's rows at that size, one more row), E1-Full adds its
LoRA side paths, and the fit check refuses an edit beyond the machine naming the phase."""

import importlib.util
from pathlib import Path

import pytest

from e1_support import FIXTURES, user_layout
from hidream_mlx.families.i1.e1 import memory as edit_memory
from hidream_mlx.families.i1.e1.memory import adapter_bytes, check_fits_e1, edit_memory as memory_of, \
    edit_phase_peaks
from hidream_mlx.families.i1.e1.recipes import E1_1, E1_FULL, get_e1_recipe
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.families.i1.memory import phase_peaks, sampling_activations
from hidream_mlx.families.i1.weights import expert_widths


def _tool(name):
    path = Path(__file__).parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


def test_the_released_e1_1_edit_samples_3_rows_of_8192_tokens(tmp_path):
    base = tmp_path / "i1"
    _tool("make_sparse_i1_checkpoint").main([str(base), "--from", str(FIXTURES)])
    _tool("make_sparse_i1_encoders").main([str(base), "--from", str(FIXTURES)])
    e1_1 = tmp_path / "e1_1"
    e1_1.mkdir()
    (e1_1 / "transformer").symlink_to(base / "transformer")
    source = E1Source.resolve(e1_1, base, allow_download=False)
    recipe = get_e1_recipe(E1_1)
    peaks = edit_phase_peaks(source, recipe, 1024, 1024, (1024, 1024), 4, 4, fused=True)
    assert (peaks.image_tokens, peaks.batch) == (8192, 3)
    assert peaks.whole == peaks.sample
    memory = memory_of(source)
    i1 = phase_peaks(memory, 4, 4, 1024, 1024, True, 2, fused=True)
    weights = memory.component_bytes("transformer", 4, 2)
    assert peaks.sample - weights > 2.5 * (i1.sample - weights)  # 3 x (8192 + text) vs 2 x (4096 + text)
    expert = max(expert_widths(memory.weights["transformer"].tensors, "transformer"))
    step = sampling_activations(memory.transformer_cfg, expert, 2048, 1024, 8, 3, 2, True, 128, 8192)
    assert peaks.sample > weights + step
    single = edit_phase_peaks(source, recipe.with_overrides(guidance=1.0), 1024, 1024, (1024, 1024), 4, 4,
                              fused=True)
    assert single.batch == 1 and single.sample < peaks.sample


def test_e1_full_counts_its_lora_beside_the_base_transformer(layout, monkeypatch):
    full = E1Source.resolve(layout["e1_full"], layout["base"])
    expected = sum((layer.A.size + layer.B.size) * 2 for layer in full.e1_full.lora.values())
    assert adapter_bytes(full, 2) == expected > 0
    assert adapter_bytes(E1Source.resolve(layout["e1_1"], layout["base"]), 2) == 0
    recipe, size = get_e1_recipe(E1_FULL), (96, 96)
    with_lora = edit_phase_peaks(full, recipe, *size, size, dtype_bytes=2, fused=True)
    monkeypatch.setattr(edit_memory, "adapter_bytes", lambda source, dtype_bytes: 0)
    without = edit_phase_peaks(full, recipe, *size, size, dtype_bytes=2, fused=True)
    assert with_lora.sample - without.sample == expected


def test_the_fit_check_names_the_phase_and_what_shrinks_it(layout, monkeypatch):
    source = E1Source.resolve(layout["e1_1"], layout["base"])
    peaks = edit_phase_peaks(source, get_e1_recipe(E1_1), 128, 128, (128, 128), dtype_bytes=4, fused=False)
    monkeypatch.setattr(edit_memory, "machine_memory", lambda: peaks.whole - 1)
    with pytest.raises(MemoryError, match=f"its {peaks.largest} phase.*--force"):
        check_fits_e1(peaks)
    monkeypatch.setattr(edit_memory, "machine_memory", lambda: peaks.whole)
    check_fits_e1(peaks)
