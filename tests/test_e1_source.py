"""Where an edit's weights come from, checked before any weight loads: E1.1 and E1-Full recognised
by what they hold (never by name), the base recognised as an I1 pipeline by its model_index.json
and read for its scheduler config, E1-Full's LoRA factor 16 / rank, and one clear error for
each thing that does not fit."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from e1_support import FIXTURES, user_layout
from hidream_mlx.families.i1.e1.recipes import E1_1, E1_FULL
from hidream_mlx.families.i1.e1.source import (E1Source, E1SourceError, EditScheduler, e1_model_kind,
                                                 resolve_e1_model)
from hidream_mlx.families.i1.e1.replay import edit_transformer
from hidream_mlx.schedulers import unipc_schedule
from hidream_mlx.weights.loading import ModelLoadError
from hidream_mlx.weights.lora import AdapterLinear


@pytest.fixture()
def layout(tmp_path):
    return user_layout(tmp_path)


def test_models_are_recognised_by_what_they_hold_whatever_their_names(layout, tmp_path):
    assert e1_model_kind(layout["e1_1"]) == E1_1
    assert e1_model_kind(layout["e1_full"]) == E1_FULL
    assert e1_model_kind(layout["e1_full"] / "HiDream-E1-Full.safetensors") == E1_FULL
    assert e1_model_kind(layout["base"]) is None  # an I1 pipeline, not an E1 model
    renamed = tmp_path / "HiDream-I1-Full-backup"
    layout["e1_1"].rename(renamed)
    assert e1_model_kind(renamed) == E1_1
    assert e1_model_kind("HiDream-ai/HiDream-E1-1") == E1_1 and e1_model_kind("HiDream-ai/HiDream-E1-Full") == E1_FULL


def test_an_i1_pipeline_is_not_taken_as_an_e1_model(layout):
    with pytest.raises(E1SourceError, match="not a HiDream-E1 model"):
        resolve_e1_model(str(layout["base"]))


def test_e1_1_needs_no_transformer_weights_in_its_base(layout):
    (layout["base"] / "transformer").unlink()
    source = E1Source.resolve(layout["e1_1"], layout["base"])
    assert source.kind == E1_1 and source.transformer_folder == layout["e1_1"] / "transformer"
    assert "transformer weights are not needed" in source.requirements()
    with pytest.raises(E1SourceError, match="no transformer/"):
        E1Source.resolve(layout["e1_full"], layout["base"])


def test_the_base_is_recognised_by_its_model_index_not_its_folder_name(layout, tmp_path):
    odd = tmp_path / "my-models"
    layout["base"].rename(odd)
    assert E1Source.resolve(layout["e1_1"], odd).path == odd
    with pytest.raises(E1SourceError, match="not a HiDream-I1 pipeline"):
        E1Source.resolve(layout["e1_1"], layout["e1_1"])  # no model_index.json


def test_a_base_naming_another_pipeline_is_refused(layout):
    index = layout["base"] / "model_index.json"
    data = json.loads(index.read_text())
    index.unlink()
    index.write_text(json.dumps({**data, "_class_name": "FluxPipeline"}))
    with pytest.raises(E1SourceError, match="'FluxPipeline'"):
        E1Source.resolve(layout["e1_1"], layout["base"])


def replace_scheduler(base, config: dict) -> None:
    (base / "scheduler").unlink()
    (base / "scheduler").mkdir()
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))


def test_a_dev_or_fast_base_s_flash_scheduler_is_refused_by_name(layout):
    replace_scheduler(layout["base"], {"_class_name": "FlashFlowMatchEulerDiscreteScheduler", "shift": 6.0})
    with pytest.raises(E1SourceError, match="FlashFlowMatchEulerDiscreteScheduler.*HiDream-I1-Full"):
        E1Source.resolve(layout["e1_1"], layout["base"])


def test_unipc_settings_the_sampler_does_not_implement_are_refused(layout):
    config = json.loads((FIXTURES / "scheduler" / "scheduler_config.json").read_text())
    replace_scheduler(layout["base"], {**config, "solver_order": 3})
    with pytest.raises(E1SourceError, match="solver_order = 3"):
        E1Source.resolve(layout["e1_1"], layout["base"])


def test_an_older_base_with_the_official_i1_unipc_shifts_twice_as_that_class_does():
    config = {"_class_name": "FlowUniPCMultistepScheduler", "shift": 3.0, "solver_order": 2, "solver_type": "bh2",
              "predict_x0": True, "use_dynamic_shifting": False}
    schedule = EditScheduler.from_config(config, "x").schedule(28)
    np.testing.assert_array_equal(schedule.timesteps, unipc_schedule(28, 3.0).timesteps)


def test_the_editing_sampler_reads_the_base_s_flow_shift(layout):
    config = json.loads((FIXTURES / "scheduler" / "scheduler_config.json").read_text())
    replace_scheduler(layout["base"], {**config, "flow_shift": 5.0})
    assert E1Source.resolve(layout["e1_1"], layout["base"]).scheduler.shift == 5.0


def rewrite_checkpoint(layout, change) -> None:
    """Replace the E1-Full checkpoint by ``change(tensors)``'s."""
    path = layout["e1_full"] / "HiDream-E1-Full.safetensors"
    tensors = dict(mx.load(str(path.resolve())))
    path.unlink()
    mx.save_safetensors(str(path), change(tensors))


def test_e1_full_s_lora_factor_is_16_over_the_rank_read_from_lora_a(layout):
    def rank_8(tensors):
        out = {}
        for k, v in tensors.items():
            out[k] = v[:8] if ".lora_A." in k else v[:, :8] if ".lora_B." in k else v
        return out

    default = E1Source.resolve(layout["e1_full"], layout["base"])
    assert default.e1_full.ranks == (16,) and {l.alpha for l in default.e1_full.lora.values()} == {16.0}
    rewrite_checkpoint(layout, rank_8)
    source = E1Source.resolve(layout["e1_full"], layout["base"])
    assert source.e1_full.ranks == (8,)
    model = edit_transformer(source)
    adapters = [m for _, m in model.named_modules() if isinstance(m, AdapterLinear)]
    assert len(adapters) == len(source.e1_full.lora) and {m.factor for m in adapters} == {2.0}


def test_e1_full_s_partial_tensors_replace_the_base_s(layout):
    source = E1Source.resolve(layout["e1_full"], layout["base"])
    partial = source.e1_full.partial
    assert partial and all(source.index[k].file.name == "HiDream-E1-Full.safetensors" for k in partial)
    others = set(source.index) - set(partial)
    assert all(source.index[k].file.parent.name == "transformer" for k in others)


@pytest.mark.parametrize("change,message", [
    (lambda t: {**t, "x_embedder.proj.bias": mx.zeros((3,))}, "has shape"),
    (lambda t: {**t, "not_a_layer.weight": mx.zeros((3,))}, "not a parameter of the base transformer"),
    (lambda t: {k: v for k, v in t.items() if ".lora_" not in k}, "no LoRA tensors"),
    (lambda t: {**t, "nowhere.lora_A.default.weight": mx.zeros((16, 4)),
                "nowhere.lora_B.default.weight": mx.zeros((4, 16))}, "does not have"),
])
def test_an_e1_full_checkpoint_that_does_not_fit_the_base_is_refused_in_one_line(layout, change, message):
    rewrite_checkpoint(layout, change)
    with pytest.raises(E1SourceError, match=message):
        E1Source.resolve(layout["e1_full"], layout["base"])


def test_without_text_encoder_4_the_base_needs_llama(layout):
    (layout["base"] / "text_encoder_4").unlink()
    with pytest.raises(ModelLoadError, match="pass --llama"):
        E1Source.resolve(layout["e1_1"], layout["base"], allow_download=False)


def test_a_copied_folder_resolves_like_the_linked_one(layout, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(layout["e1_1"], copy, symlinks=False)
    assert E1Source.resolve(copy, layout["base"]).kind == E1_1
