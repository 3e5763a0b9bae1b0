"""replay_e1_case on the recorded E1 sampling runs: it writes the run's own keys (schedule, refine
start, stage outputs, guided inputs, latents, decode) and they follow the official run. The
non-official unaliased variant (edit with I1-Full's transformer, refine with E1.1's weights loaded
into it) goes through the same stage hook that switches E1-Full's LoRA, so the weight swap is
checked too. Free-running latents are judged at 1e-2 and the image within one level (the fixture
README: 3-way guidance amplifies float32 noise), single steps at 1e-4 elsewhere."""

import numpy as np
import pytest

from e1_support import FIXTURES, assert_image_close, golden, max_abs, user_layout
from hidream_mlx.families.i1.e1.replay import replay_e1_case
from hidream_mlx.families.i1.e1.source import E1Source
from hidream_mlx.family import ReplayError


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return user_layout(tmp_path_factory.mktemp("e1"))


@pytest.mark.parametrize("name", ["e1_1_sampling_swap_unaliased"])
def test_a_replayed_run_writes_its_keys_and_follows_the_official_run(name, layout):
    ref = golden(name)
    source = E1Source.resolve(layout["e1_1"], layout["base"])
    ours = replay_e1_case(FIXTURES / f"{name}.npz", layout["base"], source)
    for key in ("timesteps", "model_timesteps", "refine_start_step", "max_seq", "pipeline_image"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    for key in ("sigmas", "preprocessed_image", "image_latents", "init_latents", "edit.model_input_step0"):
        assert max_abs(ours[key], ref[key]) < 1e-4, key
    stage_keys = {k for k in ref if k.startswith(("edit.", "refine."))}
    assert stage_keys <= set(ours) and {k for k in ours if k.startswith(("edit.", "refine."))} == stage_keys
    for key in ("latents", "guided", "edit.model_output_left", "final_latents", "vae_input", "decoded"):
        assert ours[key].shape == ref[key].shape, key
        assert max_abs(ours[key], ref[key]) < 1e-2, key
    assert_image_close(ours["image"], ref["image"], levels=1, identical=0.99)


def test_a_sampling_case_refuses_a_model_of_the_other_kind(layout):
    source = E1Source.resolve(layout["e1_full"], layout["base"])
    with pytest.raises(ReplayError, match="E1.1 model"):
        replay_e1_case(FIXTURES / "e1_1_sampling.npz", layout["base"], source)


def test_a_file_of_no_e1_format_is_refused(tmp_path, layout):
    case = tmp_path / "other.npz"
    np.savez(case, x=np.zeros(3))
    with pytest.raises(ReplayError, match="not a HiDream-E1 case"):
        replay_e1_case(case, layout["base"])
