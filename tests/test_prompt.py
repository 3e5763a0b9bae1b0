"""The prompt side: chat template, token ids, token types and positions match the reference."""

import json

import numpy as np
import pytest
from conftest import FIXTURES, case_meta, load_case

from hidream_mlx.families.o1.positions import patch_positions, t2i_positions
from hidream_mlx.families.o1.replay import prefix_length
from hidream_mlx.families.o1.prompt import Tokenizer, chat_text, encode_prompt

FORWARD = load_case("forward_t2i.npz")
CASES = sorted({k.split(".")[0] for k in FORWARD.files})


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(FIXTURES)


@pytest.mark.parametrize("case", CASES)
def test_chat_text_is_the_official_template(case):
    meta = case_meta(f"forward_t2i.{case}")
    assert chat_text(meta["prompt"]) == meta["template"]


def test_chat_text_agrees_with_the_checkpoint_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Template((FIXTURES / "chat_template.jinja").read_text())
    rendered = template.render(messages=[{"role": "user", "content": "a cat"}], add_generation_prompt=True)
    assert chat_text("a cat") == rendered + "<|boi_token|><|tms_token|>"


@pytest.mark.parametrize("case", CASES)
def test_prompt_ids_equal_the_recorded_input_ids(tokenizer, case):
    meta = case_meta(f"forward_t2i.{case}")
    ids = encode_prompt(tokenizer, meta["prompt"])
    np.testing.assert_array_equal(ids, FORWARD[f"{case}.input_ids"][0])


def test_sampling_prompts_and_the_unconditional_prompt_encode_exactly(tokenizer):
    full = load_case("full_sampling.npz")
    meta = case_meta("full_sampling")
    np.testing.assert_array_equal(encode_prompt(tokenizer, meta["prompt"]), full["input_ids_cond"][0])
    np.testing.assert_array_equal(encode_prompt(tokenizer, meta["uncond_prompt"]),
                                  full["input_ids_uncond"][0])
    dev = load_case("dev_sampling.npz")
    np.testing.assert_array_equal(encode_prompt(tokenizer, case_meta("dev_sampling")["prompt"]),
                                  dev["input_ids"][0])


@pytest.mark.parametrize("case", CASES)
def test_the_cached_prefix_is_the_text_before_tms(case):
    # Official token types: text is autoregressive, tms and the patches are generation tokens.
    meta = case_meta(f"forward_t2i.{case}")
    assert prefix_length(FORWARD[f"{case}.token_types"]) == meta["text_len"] - 1


@pytest.mark.parametrize("case", CASES)
def test_positions_put_patches_at_the_4096_fix_point(case):
    meta = case_meta(f"forward_t2i.{case}")
    pos = t2i_positions(meta["text_len"], meta["height"] // 32, meta["width"] // 32)
    np.testing.assert_array_equal(pos, FORWARD[f"{case}.position_ids"][:, 0])


def test_sampling_positions_are_exact():
    for name, suffix in (("dev_sampling", ""), ("full_sampling", "_cond"), ("full_sampling", "_uncond")):
        data, meta = load_case(f"{name}.npz"), case_meta(name)
        text_len = data[f"input_ids{suffix}"].shape[1]
        pos = t2i_positions(text_len, meta["height"] // 32, meta["width"] // 32)
        np.testing.assert_array_equal(pos, data[f"position_ids{suffix}"][:, 0])
        assert prefix_length(data[f"token_types{suffix}"]) == text_len - 1


def test_patch_positions_do_not_depend_on_text_length():
    a = t2i_positions(10, 3, 5)[:, 10:]
    b = t2i_positions(40, 3, 5)[:, 40:]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, patch_positions(3, 5))
    assert a[:, 7].tolist() == [4096, 4097, 4098]  # row 1, column 2


def test_a_folder_without_the_hidream_tokenizer_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    vocab = json.loads((FIXTURES / "tokenizer.json").read_text())
    vocab["added_tokens"] = [t for t in vocab["added_tokens"] if t["content"] != "<|tms_token|>"]
    vocab["model"]["vocab"].pop("<|tms_token|>", None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="not a HiDream-O1 tokenizer"):
        Tokenizer(tmp_path)
