"""HiDream-I1 text side: tokenizers, the four encoders and the conditioning the transformer gets,
against the PyTorch pipeline's golden arrays (text_encoding.npz)."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hidream_mlx.families.i1.clip import load_clip
from hidream_mlx.families.i1.encoder_common import quantize_linears
from hidream_mlx.families.i1.llama import LlamaConfig, LlamaModel, inverse_frequencies, load_llama
from hidream_mlx.families.i1.spiece import t5_tokenizer_from_spiece
from hidream_mlx.families.i1.t5 import load_t5
from hidream_mlx.families.i1.text_encoding import COMPONENTS, PromptCache, TextEncoders, prompt_embedding
from hidream_mlx.families.i1.tokenization import PromptTokenizer, _clip_from_vocab
from hidream_mlx.weights.loading import ModelLoadError

FIXTURES = Path(os.environ.get("HIDREAM_I1_FIXTURES", Path(__file__).parent / "fixtures" / "i1-tiny"))
TOL = 1e-4
SIDES = ("pos", "neg")


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURES / "text_encoding.npz")


def make_encoders(**options) -> TextEncoders:
    """Encoders for the fixture set, at the sequence length its goldens were made with."""
    length = int(np.load(FIXTURES / "text_encoding.npz")["max_sequence_length"])
    return TextEncoders(FIXTURES, max_sequence_length=length, **options)


@pytest.fixture(scope="module")
def encoders():
    return make_encoders(keep_loaded=True)


def text_of(golden, side: str) -> str:
    return str(golden["prompt"] if side == "pos" else golden["negative_prompt"])


def assert_close(actual, expected, what: str):
    actual = np.array(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max())
    assert err < TOL, f"{what}: max abs error {err:.2e}"


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", list(COMPONENTS))
def test_token_ids_and_masks_are_the_pipelines(encoders, golden, name, side):
    tokens = encoders.tokenize(name, [text_of(golden, side)])
    np.testing.assert_array_equal(tokens.input_ids, golden[f"{side}.{name}.input_ids"])
    np.testing.assert_array_equal(tokens.attention_mask, golden[f"{side}.{name}.attention_mask"])


@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_clip_from_vocab_and_merges_gives_the_tokenizer_json_ids(encoders, golden, folder):
    config = json.loads((FIXTURES / folder / "tokenizer_config.json").read_text())
    name = "clip_l" if folder == "tokenizer" else "clip_g"
    reference = encoders.tokenizer(name)
    rebuilt = PromptTokenizer(_clip_from_vocab(FIXTURES / folder, config), reference.max_length,
                              reference.pad_token, folder)
    texts = [text_of(golden, "pos"), "", "Two  SPACES, digits 2026 and <|endoftext|> inside!"]
    np.testing.assert_array_equal(rebuilt(texts).input_ids, reference(texts).input_ids)


def test_t5_from_spiece_model_gives_the_tokenizer_json_ids(encoders, golden):
    reference = encoders.tokenizer("t5")
    rebuilt = PromptTokenizer(t5_tokenizer_from_spiece(FIXTURES / "tokenizer_3" / "spiece.model"),
                              reference.max_length, reference.pad_token, "tokenizer_3")
    texts = [text_of(golden, "pos"), "", "  Two   spaces, ＡＢＣ café <extra_id_3> and </s>\tx", "ﬁne ½"]
    np.testing.assert_array_equal(rebuilt(texts).input_ids, reference(texts).input_ids)


def test_long_prompts_are_truncated_keeping_the_end_tokens(encoders):
    long = " ".join(["cat"] * 400)
    for name in COMPONENTS:
        tokens = encoders.tokenize(name, [long, "a cat"])
        assert tokens.input_ids.shape == (2, encoders.tokenizer(name).max_length)
        assert tokens.truncated == [True, False]
    clip = encoders.tokenize("clip_l", [long]).input_ids[0]
    assert clip[-1] == encoders.tokenizer("clip_l").tokenizer.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("side", SIDES)
def test_every_encoder_output_matches_the_reference(encoders, golden, side):
    text = [text_of(golden, side)]
    for name in ("clip_l", "clip_g"):
        out = encoders.run(name, text)
        assert_close(out["text_embeds"], golden[f"{side}.{name}.text_embeds"], f"{side}.{name}.text_embeds")
        assert_close(out["last_hidden_state"], golden[f"{side}.{name}.last_hidden_state"],
                     f"{side}.{name}.last_hidden_state")
    assert_close(encoders.run("t5", text)["last_hidden_state"], golden[f"{side}.t5_embeds"], f"{side}.t5")
    assert_close(encoders.run("llama", text)["hidden_states"], golden[f"{side}.llama_hidden_states"],
                 f"{side}.llama")


def test_cfg_conditioning_is_negative_then_positive(encoders, golden):
    emb = prompt_embedding(encoders, text_of(golden, "pos"), None, guidance_scale=5.0)
    assert emb.batch_size == 2
    for key, axis in (("pooled_embeds", 0), ("t5_embeds", 0), ("llama_hidden_states", 1)):
        expected = np.concatenate([golden[f"neg.{key}"], golden[f"pos.{key}"]], axis=axis)
        assert_close(getattr(emb, key), expected, key)


def test_without_cfg_only_the_prompt_is_encoded(encoders, golden):
    emb = prompt_embedding(encoders, text_of(golden, "pos"), "ignored", guidance_scale=1.0)
    assert emb.batch_size == 1
    assert_close(emb.pooled_embeds, golden["pos.pooled_embeds"], "pooled")
    assert_close(emb.llama_hidden_states, golden["pos.llama_hidden_states"], "llama")


def test_cache_encodes_each_distinct_prompt_once(golden, monkeypatch):
    encoders = make_encoders()
    seen = []
    real = TextEncoders.encode
    monkeypatch.setattr(TextEncoders, "encode", lambda self, texts: seen.append(list(texts)) or real(self, texts))
    cache = PromptCache()
    prompt = text_of(golden, "pos")
    first = prompt_embedding(encoders, prompt, "", guidance_scale=5.0, cache=cache)
    again = prompt_embedding(encoders, prompt, "", guidance_scale=5.0, cache=cache)
    prompt_embedding(encoders, "", guidance_scale=0.0, cache=cache)
    assert seen == [["", prompt]]
    assert len(cache) == 2
    np.testing.assert_array_equal(np.array(first.t5_embeds), np.array(again.t5_embeds))


def test_encode_frees_each_encoder_after_use(golden):
    encoders = make_encoders()
    emb = encoders.encode([text_of(golden, "pos")])
    assert encoders._models == {}
    assert_close(emb.t5_embeds, golden["pos.t5_embeds"], "t5 after freeing")


# --- strict loading ---------------------------------------------------------------------------

def copy_with_tensors(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = dict(mx.load(str(dst / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


@pytest.mark.parametrize("loader,folder", [(load_clip, "text_encoder"), (load_t5, "text_encoder_3"),
                                           (load_llama, "text_encoder_4")])
def test_loading_names_missing_extra_and_misshaped_tensors(tmp_path, loader, folder):
    src = FIXTURES / folder
    name = sorted(k for k in mx.load(str(src / "model.safetensors")) if k.endswith("layer_norm.weight")
                  or k.endswith("layernorm.weight") or k.endswith("layer_norm1.weight"))[0]
    missing = copy_with_tensors(src, tmp_path / "missing", lambda w: w.pop(name))
    with pytest.raises(ModelLoadError, match=f"missing tensor {name}"):
        loader(missing)
    extra = copy_with_tensors(src, tmp_path / "extra", lambda w: w.update({"stray.weight": mx.zeros((2,))}))
    with pytest.raises(ModelLoadError, match="unexpected tensor stray.weight"):
        loader(extra)
    bad = copy_with_tensors(src, tmp_path / "bad", lambda w: w.update({name: mx.zeros((w[name].shape[0] + 1,))}))
    with pytest.raises(ModelLoadError, match=f"tensor {name} has shape"):
        loader(bad)


def test_llama_skips_lm_head_and_t5_accepts_a_stored_tied_table(tmp_path):
    stored = set(mx.load(str(FIXTURES / "text_encoder_4" / "model.safetensors")))
    ours = {f"model.{k}" for k, _ in tree_flatten(load_llama(FIXTURES / "text_encoder_4").parameters())}
    assert stored - ours == {"lm_head.weight"} & stored and ours <= stored  # tied heads are not stored
    both = copy_with_tensors(FIXTURES / "text_encoder_3", tmp_path / "t5",
                             lambda w: w.update({"encoder.embed_tokens.weight": w["shared.weight"]}))
    load_t5(both)


def test_rope_config_in_transformers_4_form_gives_the_same_frequencies():
    cfg = json.loads((FIXTURES / "text_encoder_4" / "config.json").read_text())
    new = LlamaConfig.from_dict(cfg)
    old_style = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    params = dict(cfg.get("rope_parameters") or {})
    old_style["rope_theta"] = params.pop("rope_theta", 10000.0)
    old_style["rope_scaling"] = params or None
    np.testing.assert_array_equal(inverse_frequencies(new), inverse_frequencies(LlamaConfig.from_dict(old_style)))


# --- quantization -----------------------------------------------------------------------------

GROUP = 32  # the smallest group MLX supports: divides the most tiny widths


def quantized_paths(module: nn.Module) -> set[str]:
    return {p for p, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)}


def linear_widths(module: nn.Module) -> dict[str, int]:
    return {p: m.weight.shape[1] for p, m in module.named_modules() if isinstance(m, nn.Linear)}


def llama_states(model, encoders, golden):
    tokens = encoders.tokenize("llama", [text_of(golden, "pos")])
    return np.array(model.hidden_states(mx.array(tokens.input_ids), mx.array(tokens.attention_mask)))


def test_quantizing_on_load_keeps_indivisible_layers_in_floats(golden):
    widths = {"t5": linear_widths(load_t5(FIXTURES / "text_encoder_3")),
              "llama": linear_widths(load_llama(FIXTURES / "text_encoder_4"))}
    encoders = make_encoders(quantize_bits=8, group_size=GROUP, keep_loaded=True)
    emb = encoders.encode([text_of(golden, "pos")])
    for name, width in widths.items():
        assert quantized_paths(encoders.model(name)) == {p for p, w in width.items() if w % GROUP == 0}
        assert set(encoders.kept_in_float[name]) == {p for p, w in width.items() if w % GROUP}
    assert not quantized_paths(encoders.model("clip_l"))
    for key in ("t5_embeds", "llama_hidden_states"):
        expected = golden[f"pos.{key}"]
        assert np.abs(np.array(getattr(emb, key)) - expected).max() < 0.05 * np.abs(expected).max(), key
    with pytest.raises(ValueError, match="bits"):
        make_encoders(quantize_bits=3)


def test_prequantized_mlx_lm_llama_folder_loads_and_stays_close(tmp_path, encoders, golden):
    model = load_llama(FIXTURES / "text_encoder_4")
    float_states = llama_states(model, encoders, golden)
    quantize_linears(model, bits=8, group_size=GROUP)
    in_memory = llama_states(model, encoders, golden)
    folder = tmp_path / "llama-8bit"
    folder.mkdir()
    config = json.loads((FIXTURES / "text_encoder_4" / "config.json").read_text())
    config["quantization"] = {"group_size": GROUP, "bits": 8}
    (folder / "config.json").write_text(json.dumps(config))
    weights = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
    weights["lm_head.weight"] = mx.zeros((4, 4))  # mlx-lm keeps a head; we never load it
    mx.save_safetensors(str(folder / "model.safetensors"), weights)

    reloaded = load_llama(folder)
    assert quantized_paths(reloaded) == quantized_paths(model)
    np.testing.assert_array_equal(llama_states(reloaded, encoders, golden), in_memory)
    assert np.abs(in_memory - float_states).max() < 0.05 * np.abs(float_states).max()


def test_quantizing_on_load_never_holds_all_float_weights(tmp_path):
    """The point of -q for an 8B Llama on a small Mac: the peak stays near the quantized size."""
    config = json.loads((FIXTURES / "text_encoder_4" / "config.json").read_text())
    config.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=256)
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    skeleton = LlamaModel(LlamaConfig.from_dict(config))
    weights = {f"model.{k}": v.astype(mx.bfloat16) for k, v in tree_flatten(skeleton.parameters())}
    float_bytes = sum(v.nbytes for v in weights.values())
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    del skeleton, weights
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_llama(folder, mx.bfloat16)
    quantize_linears(model, bits=4, group_size=64)
    mx.eval(model.parameters())
    assert mx.get_peak_memory() - before < 0.5 * float_bytes


def test_llama_can_come_from_its_own_folder(tmp_path, golden):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    for name, (encoder, tokenizer, _) in COMPONENTS.items():
        if name != "llama":
            (pipeline / encoder).symlink_to(FIXTURES / encoder)
            (pipeline / tokenizer).symlink_to(FIXTURES / tokenizer)
    with pytest.raises(ModelLoadError, match="llama_dir"):
        TextEncoders(pipeline)
    llama = tmp_path / "llama"
    shutil.copytree(FIXTURES / "text_encoder_4", llama)
    for f in (FIXTURES / "tokenizer_4").iterdir():
        shutil.copy(f, llama / f.name)
    length = int(golden["max_sequence_length"])
    emb = TextEncoders(pipeline, llama_dir=llama, max_sequence_length=length).encode([text_of(golden, "pos")])
    assert_close(emb.llama_hidden_states, golden["pos.llama_hidden_states"], "llama from llama_dir")
