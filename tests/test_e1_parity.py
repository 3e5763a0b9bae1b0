"""HiDream-E1 single calls against the official pipeline, within 1e-4: the prompt encodings and
stage batches, the VAE encoder (resize, preprocess, posterior, shifted and scaled latents), the
E1.1 transformer on the padded editing input and the square refine input, and every step of the
recorded E1.1 and E1-Full runs teacher-forced (E1-Full's LoRA on while editing, off to refine)."""

import mlx.core as mx
import numpy as np
import pytest

from e1_support import FIXTURES, TOL, golden, max_abs, user_layout
from hidream_mlx.families.i1.e1.replay import e1_case_kind, edit_transformer, replay_e1, replay_e1_case
from hidream_mlx.families.i1.e1.sampling import edit_model_input, image_rows
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.families.i1.sampling import Conditioning
from hidream_mlx.weights.lora import set_adapters_enabled


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


@pytest.fixture(scope="module")
def sources(layout):
    return {kind: E1Source.resolve(layout[kind], layout["base"]) for kind in ("e1_1", "e1_full")}


def compare(ours: dict, ref: dict, skip=()) -> list[str]:
    """The reference's output keys we wrote, after checking each: strings and ids exactly, arrays within TOL."""
    checked = []
    for key in sorted(set(ours) & set(ref)):
        if key in skip:
            continue
        assert ours[key].shape == ref[key].shape, key
        if ref[key].dtype.kind in "USbi":
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
        else:
            assert max_abs(ours[key], ref[key]) < TOL, key
        checked.append(key)
    return checked


def test_each_case_file_is_recognised_by_its_keys():
    kinds = {name: e1_case_kind(golden(name)) for name in ("edit_encoding", "image_latents", "edit_forward",
                                                           "e1_1_sampling", "e1_full_sampling")}
    assert kinds == {"edit_encoding": "edit_encoding", "image_latents": "image_latents",
                     "edit_forward": "edit_forward", "e1_1_sampling": "sampling", "e1_full_sampling": "sampling"}


def test_prompt_encodings_targets_and_stage_batches_match(layout):
    ref = golden("edit_encoding")
    ours = replay_e1_case(FIXTURES / "edit_encoding.npz", layout["base"])
    checked = compare(ours, ref)
    assert set(ref) <= set(ours)  # every recorded key is written
    assert any(k.endswith(".target.pos.llama_hidden_states") for k in checked)
    assert any(k.endswith(".cfg3_clip_cfg_norm.llama") for k in checked)


def test_the_vae_encoder_gives_the_recorded_posterior_and_latents(layout):
    ref = golden("image_latents")
    ours = replay_e1_case(FIXTURES / "image_latents.npz", layout["base"])
    checked = compare(ours, ref)
    wanted = {k for k in ref if k.split(".")[-1] in ("resized_image", "preprocessed_image", "latent_dist_mean",
                                                     "latent_dist_std", "image_latents", "image_latents_cfg3")}
    assert wanted and wanted <= set(checked)


def test_the_e1_1_transformer_on_both_recorded_calls_and_its_patchify(layout, sources):
    ref = golden("edit_forward")
    ours = replay_e1_case(FIXTURES / "edit_forward.npz", layout["base"], sources["e1_1"])
    checked = compare(ours, ref)
    calls = {k.split(".")[0] for k in ref if k.endswith(".kept_negated")}
    assert {f"{c}.{k}" for c in calls for k in ("output", "kept_negated")} <= set(checked)
    assert {"patchify.tokens", "patchify.img_ids", "patchify.img_sizes", "patchify.has_mask"} <= set(checked)
    assert ("patchify.hidden_states_masks" in ref) == ("patchify.hidden_states_masks" in checked)


def test_an_edit_forward_case_needs_an_e1_model(layout):
    with pytest.raises(ValueError, match="give it with --model"):
        replay_e1_case(FIXTURES / "edit_forward.npz", layout["base"])


def stage_conditioning(tag: str, order) -> Conditioning:
    """A stage's text batch in ``order`` (pos / neg / target), from the recorded encodings."""
    text = golden("edit_encoding")
    prefix = {"pos": f"{tag}.pos", "neg": f"{tag}.neg",
              "target": f"{tag}.target.pos" if f"{tag}.target.pos.t5_embeds" in text else f"{tag}.pos"}
    parts = [prefix[str(role)] for role in order]
    return Conditioning(mx.array(np.concatenate([text[f"{p}.t5_embeds"] for p in parts])),
                        mx.array(np.concatenate([text[f"{p}.llama_hidden_states"] for p in parts], axis=1)),
                        mx.array(np.concatenate([text[f"{p}.pooled_embeds"] for p in parts])))


@pytest.mark.parametrize("name,tag", [("e1_1_sampling", "e1_1"), ("e1_full_sampling", "e1_full")])
def test_every_recorded_step_teacher_forced_within_1e_4(name, tag, sources):
    case, text = golden(name), golden("edit_encoding")
    source = sources[tag]
    model = edit_transformer(source)
    arrangement = "cfg3_clip_cfg_norm" if bool(case["clip_cfg_norm"]) else "cfg3_plain"
    edit = stage_conditioning(tag, text[f"{tag}.{arrangement}.order"])
    refine = stage_conditioning(tag, text[f"{tag}.refine_cfg2.order"])
    images = image_rows(mx.array(case["image_latents"]), True)
    start, width = int(case["refine_start_step"]), case["image_latents"].shape[-1]
    for i, t in enumerate(case["timesteps"]):
        x = mx.array(case["init_latents"] if i == 0 else case["latents"][i - 1])
        refining = 0 <= start <= i
        set_adapters_enabled(model, not refining)
        c = refine if refining else edit
        batch = mx.concatenate([x, x]) if refining else edit_model_input(x, images, 3)
        out = model(batch, mx.full((batch.shape[0],), float(t)), c.t5, c.llama_stack, c.pooled, int(case["max_seq"]))
        ref = case["refine.model_output"][i - start] if refining else case["edit.model_output_left"][i]
        assert max_abs(out[..., :width], ref) < TOL, i


def test_the_replay_command_s_entry_takes_the_base_alone_or_an_e1_model_on_it(layout):
    encoded = replay_e1(str(layout["base"]), FIXTURES / "edit_encoding.npz")
    assert compare(encoded, golden("edit_encoding"))
    forward = replay_e1(str(layout["e1_1"]), FIXTURES / "edit_forward.npz", base=str(layout["base"]))
    assert max_abs(forward["call1.output"], golden("edit_forward")["call1.output"]) < TOL
    with pytest.raises(ValueError, match="give it with --model"):
        replay_e1(str(layout["base"]), FIXTURES / "edit_forward.npz")
