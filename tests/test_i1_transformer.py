"""HiDream-I1 transformer against the PyTorch reference (transformer_forward.npz), plus the
parts the golden set does not exercise: routing ties and the padded non-square path."""
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from hidream_mlx.families.i1.blocks import apply_rope, rope_angles
from hidream_mlx.families.i1.config import TransformerConfig
from hidream_mlx.families.i1.moe import MoEGate, route
from hidream_mlx.families.i1.transformer import HiDreamImageTransformer, patchify, unpatchify
from hidream_mlx.families.i1.weights import load_transformer
from hidream_mlx.weights.loading import ModelLoadError
from i1_support import FIXTURES, TOL, golden, max_abs, record_moe_decisions, transformer

CALLS = ("call1", "call2")


def run_call(model, g, call):
    return model(*(mx.array(g[f"{call}.{k}"]) for k in
                   ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3",
                    "pooled_embeds")))


@pytest.fixture(scope="module")
def traced():
    """call1 with every intermediate and every MoE decision recorded."""
    model = transformer()
    model.debug = {}
    try:
        out, moe = record_moe_decisions(model, lambda: run_call(model, golden("transformer_forward.npz"), "call1"))
        mx.eval(out)
        dbg = dict(model.debug)
    finally:
        model.debug = None
    return out, dbg, moe


@pytest.mark.parametrize("call", CALLS)
def test_forward_matches_reference(call):
    g = golden("transformer_forward.npz")
    out = run_call(transformer(), g, call)
    assert out.shape == g[f"{call}.output"].shape
    assert max_abs(out, g[f"{call}.output"]) < TOL


def test_intermediates_match_reference(traced):
    g = golden("transformer_forward.npz")
    _, dbg, _ = traced
    names = [k[4:] for k in g if k.startswith("dbg.") and not k.startswith("dbg.moe.")]
    assert "final_layer" in names and any(n.startswith("single.") for n in names)
    for name in names:
        ours = np.asarray(dbg[name])
        if name == "rope":
            # Reference stores 2x2 rotation matrices [[cos, -sin], [sin, cos]].
            ref = g["dbg.rope"]
            cos, sin = ref[..., 0, 0].reshape(ours[..., 0].shape), ref[..., 1, 0].reshape(ours[..., 1].shape)
            assert max_abs(ours[..., 0], cos) < 1e-6 and max_abs(ours[..., 1], sin) < 1e-6
            assert max_abs(ref[..., 0, 1].reshape(sin.shape), -sin) == 0
            continue
        assert ours.shape == g[f"dbg.{name}"].shape, name
        assert max_abs(ours, g[f"dbg.{name}"]) < TOL, name


def test_moe_scores_and_exact_selection(traced):
    g = golden("transformer_forward.npz")
    _, _, moe = traced
    assert set(moe) == {k[len("dbg.moe."):-len(".scores")] for k in g if k.endswith(".scores")}
    for name, (scores, selected) in moe.items():
        e = scores.shape[-1]
        assert max_abs(np.asarray(scores).reshape(-1, e), g[f"dbg.moe.{name}.scores"]) < 1e-5, name
        assert np.array_equal(np.asarray(selected).reshape(-1, e), g[f"dbg.moe.{name}.selected"]), name


def test_patchify_is_exact():
    g = golden("transformer_forward.npz")
    cfg = transformer().cfg
    p = patchify(mx.array(g["call1.hidden_states"]), cfg.patch_size, cfg.max_seq)
    assert np.array_equal(np.asarray(p.tokens), g["patchify.tokens"])
    assert np.array_equal(np.asarray(p.ids), g["patchify.img_ids"])
    assert np.array_equal(np.broadcast_to(np.array(p.grid), g["patchify.img_sizes"].shape), g["patchify.img_sizes"])
    assert bool(g["patchify.has_mask"]) == (p.mask is not None)
    if p.mask is not None:
        assert np.array_equal(np.asarray(p.mask), g["patchify.hidden_states_masks"])
    back = unpatchify(p.tokens, p.grid, cfg.patch_size)
    assert np.array_equal(np.asarray(back), g["call1.hidden_states"])


def test_routing_ties_go_to_the_lower_expert_index():
    """Equal scores are taken in expert order (torch.topk's order on these ties)."""
    gate = MoEGate(dim=2, num_experts=4, top_k=2)
    # Token 0: experts 1, 2, 3 tie at the top. Token 1: expert 0 wins, then 1, 2, 3 tie.
    gate.weight = mx.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    _, selected = gate(mx.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert np.array_equal(np.asarray(selected), [[0, 1, 1, 0], [1, 1, 0, 0]])
    assert np.array_equal(np.asarray(route(mx.array([[0.1, 0.4, 0.4, 0.1]]), 2)), [[0, 1, 1, 0]])
    assert np.array_equal(np.asarray(route(mx.array([[0.3, 0.1, 0.3, 0.3]]), 2)), [[1, 0, 1, 0]])


def test_moe_weights_are_raw_softmax_scores_plus_shared_expert():
    model = transformer()
    moe = model.double_stream_blocks[0].block.ff_i
    x = mx.random.normal((1, 5, model.cfg.inner_dim), key=mx.random.key(0))
    scores, selected = moe.gate(x)
    expected = moe.shared_experts(x)
    for e, expert in enumerate(moe.experts):
        expected = expected + (scores * selected)[..., e:e + 1] * expert(x)
    assert float(mx.abs(moe(x) - expected).max()) < 1e-6
    assert float(mx.abs((scores * selected).sum(-1) - 1).max()) > 1e-3  # not renormalised


def tiny_config(max_resolution):
    return TransformerConfig(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                             attention_head_dim=8, num_attention_heads=2, caption_channels=[6, 10],
                             text_emb_dim=12, num_routed_experts=3, num_activated_experts=2,
                             axes_dims_rope=[4, 2, 2], max_resolution=max_resolution, llama_layers=[0, 1])


def random_model(cfg, seed=0):
    model = HiDreamImageTransformer(cfg, widths=(16, 8, 16))
    rng = np.random.default_rng(seed)
    params = [(k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
              for k, v in tree_flatten(model.parameters())]
    model.load_weights(params)
    return model


def tiny_inputs(h, w, seed=1):
    rng = np.random.default_rng(seed)
    f = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))
    return f(1, 4, h, w), mx.array([500.0]), f(1, 5, 6), f(2, 1, 7, 10), f(1, 12)


def test_padded_attention_zeroes_padded_keys_instead_of_masking():
    attn = random_model(tiny_config([8, 8])).single_stream_blocks[0].block.attn1
    rng = np.random.default_rng(3)
    x = mx.array(rng.normal(size=(1, 6, 16)).astype(np.float32))
    mask = mx.array([[1, 1, 1, 1, 0, 0]], dtype=mx.float32)
    ids = np.zeros((1, 6, 3), np.float32)
    ids[0, :4, 2] = np.arange(4)
    rope = rope_angles(ids, [4, 2, 2])
    out = np.asarray(attn(x, mask, None, rope))
    # Direct computation: padded keys give logit 0 for every query; their values still count.
    q = np.asarray(attn._heads(attn.q_rms_norm(attn.to_q(x))))
    k = np.asarray(attn._heads(attn.k_rms_norm(attn.to_k(x))))
    v = np.asarray(attn._heads(attn.to_v(x)))
    q, k = np.asarray(apply_rope(mx.array(q), rope)), np.asarray(apply_rope(mx.array(k), rope))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    logits[..., 4:] = 0.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    direct = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(1, 6, 16)
    direct = direct @ np.asarray(attn.to_out.weight).T + np.asarray(attn.to_out.bias)
    assert np.abs(out - direct).max() < 1e-5
    assert p[..., 4:].min() > 0  # padded keys keep weight: not masked with -inf


def test_non_square_output_depends_on_max_resolution():
    small, large = tiny_config([8, 8]), tiny_config([8, 16])
    a, b = random_model(small), random_model(large)
    inputs = tiny_inputs(4, 8)  # 2x4 patches padded to 16 resp. 32 tokens
    out_a, out_b = a(*inputs), b(*inputs)
    assert out_a.shape == out_b.shape == (1, 4, 4, 8)
    assert float(mx.abs(out_a - out_b).max()) > 1e-3
    patches = patchify(inputs[0], 2, small.max_seq)
    assert patches.tokens.shape[1] == small.max_seq and float(patches.mask.sum()) == 8
    # A square latent takes the unpadded path, so max_resolution does not matter there.
    square = tiny_inputs(4, 4)
    assert float(mx.abs(a(*square) - b(*square)).max()) == 0


def test_non_square_rejects_more_patches_than_max_seq():
    with pytest.raises(ValueError, match="max_seq"):
        patchify(mx.zeros((1, 4, 8, 20)), 2, tiny_config([8, 8]).max_seq)


def copy_transformer(tmp_path, edit):
    src = FIXTURES / "transformer"
    dst = tmp_path / "transformer"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_loader_names_missing_extra_and_misshaped_tensors(tmp_path):
    name = "double_stream_blocks.0.block.attn1.to_q.weight"
    cases = {
        "missing": (lambda t: t.pop(name), f"missing tensor {name}"),
        "extra": (lambda t: t.update(bogus=np.zeros(2, np.float32)), "unexpected tensor bogus"),
        "shape": (lambda t: t.update({name: t[name][:, :-1].copy()}), name),
    }
    for case, (edit, message) in cases.items():
        (tmp_path / case).mkdir()
        folder = copy_transformer(tmp_path / case, edit)
        with pytest.raises(ModelLoadError, match=message):
            load_transformer(folder)


def test_loader_reads_index_shards_lazily_in_the_asked_dtype(tmp_path):
    tensors = load_file(FIXTURES / "transformer" / "diffusion_pytorch_model.safetensors")
    names = sorted(tensors)
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(FIXTURES / "transformer" / "config.json", dst / "config.json")
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, dst / file)
    weight_map = {n: f for f, part in halves.items() for n in part}
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_transformer(dst, dtype=mx.bfloat16)
    assert model.final_layer.linear.weight.dtype == mx.bfloat16
    ref = transformer()
    assert float(mx.abs(model.x_embedder.proj.weight.astype(mx.float32) - ref.x_embedder.proj.weight).max()) < 1e-2


def test_config_errors_name_the_key(tmp_path):
    raw = json.loads((FIXTURES / "transformer" / "config.json").read_text())
    raw.pop("llama_layers")
    with pytest.raises(ModelLoadError, match="llama_layers"):
        TransformerConfig.from_dict(raw, tmp_path / "config.json")
    ok = json.loads((FIXTURES / "transformer" / "config.json").read_text())
    assert TransformerConfig.from_dict({**ok, "some_new_key": 1}).llama_layers == ok["llama_layers"]
