"""The HiDream-I1 routed layer computes each expert on its own tokens only, and gives what running
every expert on every token and weighting it by its routed score gives, summed in expert order:
for float, quantized and LoRA-carrying experts, on the gathered path and on the per-expert one."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hidream_mlx.families.i1.experts import ExpertStacks, float_gather_supported
from hidream_mlx.families.i1.moe import MoEFeedForward, top_k_experts
from hidream_mlx.families.i1.routing import block_rows, layout
from hidream_mlx.weights.lora import LoRALinear

DIM, HIDDEN, SHARED = 64, 64, 32


def random_layer(num_experts=4, top_k=2, seed=0, dtype=mx.float32):
    layer = MoEFeedForward(DIM, num_experts, top_k, HIDDEN, SHARED)
    rng = np.random.default_rng(seed)
    layer.load_weights([(k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)).astype(dtype))
                        for k, v in tree_flatten(layer.parameters())])
    return layer


def tokens(n, seed=1, dtype=mx.float32):
    return mx.array(np.random.default_rng(seed).normal(size=(2, n, DIM)).astype(np.float32)).astype(dtype)


def every_expert_on_every_token(layer, x):
    """The former dense formulation: ``sum_e mask_e * score_e * expert_e(x)`` in expert order."""
    scores, selected = layer.gate(x)
    weights = (scores * selected).astype(x.dtype)
    y = mx.zeros_like(x)
    for e, expert in enumerate(layer.experts):
        y = y + weights[..., e:e + 1] * expert(x)
    return y + layer.shared_experts(x)


def quantize_experts(layer, bits=4, only=None):
    nn.quantize(layer, group_size=32, bits=bits,
                class_predicate=lambda p, m: isinstance(m, nn.Linear) and p.startswith("experts.")
                and (only is None or p.startswith(f"experts.{only}.")))


def gathered(layer, dtype=mx.float32) -> bool:
    return layer._stacks.get(layer.experts, dtype) is not None


def assert_close(a, b, tol=1e-6):
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("num_experts,top_k,n", [(4, 2, 37), (4, 2, 700), (5, 3, 150), (3, 1, 20)])
def test_routed_layer_equals_every_expert_on_every_token_weighted_by_its_score(num_experts, top_k, n):
    layer = random_layer(num_experts, top_k)
    x = tokens(n)
    out = layer(x)
    assert gathered(layer)
    assert out.shape == x.shape
    assert_close(out, every_expert_on_every_token(layer, x))


def test_quantized_experts_are_gathered_and_match_their_own_layers():
    layer = random_layer()
    quantize_experts(layer)
    x = tokens(300)
    out = layer(x)
    assert gathered(layer)
    assert isinstance(layer.experts[0].w1, nn.QuantizedLinear)
    assert_close(out, every_expert_on_every_token(layer, x))


def test_lora_side_paths_of_quantized_experts_are_included_whatever_their_ranks():
    layer = random_layer()
    quantize_experts(layer)
    rng = np.random.default_rng(5)
    # Expert 0 gets two LoRAs, expert 2 one of another rank, experts 1 and 3 none.
    for e, ranks in ((0, (2, 3)), (2, (4,))):
        wrapped = LoRALinear(layer.experts[e].w2)
        for r in ranks:
            wrapped.add(mx.array(rng.normal(0, 0.3, (r, HIDDEN)).astype(np.float32)),
                        mx.array(rng.normal(0, 0.3, (DIM, r)).astype(np.float32)), 0.7 + r)
        layer.experts[e].w2 = wrapped
    x = tokens(200)
    assert gathered(layer)
    assert_close(layer(x), every_expert_on_every_token(layer, x))


def test_the_stacks_follow_experts_changed_after_the_first_call():
    layer = random_layer()
    x = tokens(120)
    mx.eval(layer(x))
    # A merged LoRA replaces a float weight; a new array must be seen at the next call.
    layer.experts[1].w3.weight = layer.experts[1].w3.weight * 1.5
    assert_close(layer(x), every_expert_on_every_token(layer, x))
    quantize_experts(layer)
    assert_close(layer(x), every_expert_on_every_token(layer, x))
    side = LoRALinear(layer.experts[3].w1)
    layer.experts[3].w1 = side
    mx.eval(layer(x))
    side.add(mx.ones((2, DIM)) * 0.1, mx.ones((HIDDEN, 2)) * 0.1, 2.0)  # a side path added in place
    assert_close(layer(x), every_expert_on_every_token(layer, x))


def test_experts_quantized_differently_take_the_per_expert_path_and_still_match():
    layer = random_layer()
    quantize_experts(layer, bits=4)
    layer.experts[0].w1 = nn.QuantizedLinear.from_linear(nn.Linear(DIM, HIDDEN, bias=False), 32, 8)
    x = tokens(90)
    assert not gathered(layer)
    assert_close(layer(x), every_expert_on_every_token(layer, x))


def test_bfloat16_experts_match_on_whichever_path_the_backend_takes():
    layer = random_layer(dtype=mx.bfloat16)
    x = tokens(90, dtype=mx.bfloat16)
    assert gathered(layer, mx.bfloat16) == float_gather_supported(mx.bfloat16)
    assert_close(layer(x), every_expert_on_every_token(layer, x), tol=1e-2)


def unchosen_expert_layer(setup, poison):
    """A layer whose expert 3 no token can choose: every token carries feature 0 = 1 and the
    gate gives expert 3 a logit of -1e4 through it. ``poison`` fills that expert with NaN."""
    layer = random_layer(dtype=mx.bfloat16 if setup == "per-expert" else mx.float32)
    layer.gate.weight = layer.gate.weight.at[3, 0].add(-1e4)
    if setup == "quantized":
        quantize_experts(layer)
    if setup == "per-expert":
        layer.experts[0].w2 = nn.QuantizedLinear.from_linear(layer.experts[0].w2, 32, 8)
    if poison:
        for name in ("w1", "w2", "w3"):
            linear = getattr(layer.experts[3], name)
            key = "scales" if isinstance(linear, nn.QuantizedLinear) else "weight"
            setattr(linear, key, mx.full(linear[key].shape, float("nan"), linear[key].dtype))
    return layer


@pytest.mark.parametrize("setup", ["float", "quantized", "per-expert"])
def test_an_expert_no_token_chooses_is_never_evaluated(setup):
    dtype = mx.bfloat16 if setup == "per-expert" else mx.float32
    x = tokens(257, dtype=dtype)
    x = mx.concatenate([mx.ones((*x.shape[:-1], 1), dtype), x[..., 1:]], axis=-1)
    clean, poisoned = unchosen_expert_layer(setup, False), unchosen_expert_layer(setup, True)
    chosen = np.asarray(top_k_experts(poisoned.gate.scores(x), 2))
    assert 3 not in chosen and set(np.unique(chosen)) == {0, 1, 2}
    assert gathered(poisoned, dtype) == (setup != "per-expert")
    out = np.asarray(poisoned(x).astype(mx.float32))
    assert np.isfinite(out).all()
    assert np.array_equal(out, np.asarray(clean(x).astype(mx.float32)))


def test_each_tokens_outputs_are_added_in_expert_order_not_score_order():
    """Three experts, all chosen: expert 0 and 1 give +a and -a (about 1.5e7), expert 2 gives 0.4.
    In expert order (a - a) + 0.4 keeps the 0.4; in score order (expert 2 scores highest)
    (0.4 + a) - a loses it to rounding."""
    layer = MoEFeedForward(1, 3, 3, 1, 1)
    layer.gate.weight = mx.array([[0.0], [0.0], [1.0]])
    for e, c in enumerate((1e8, -1e8, 1.0)):
        layer.experts[e].w1.weight = mx.array([[1.0]])
        layer.experts[e].w3.weight = mx.array([[1.0]])
        layer.experts[e].w2.weight = mx.array([[c]])
    x = mx.array([[1.0]])
    scores = layer.gate.scores(x)
    terms = [scores[:, e:e + 1] * layer.experts[e](x) for e in range(3)]
    expert_order = (terms[0] + terms[1]) + terms[2]
    score_order = (terms[2] + terms[0]) + terms[1]
    assert float(expert_order[0, 0]) != float(score_order[0, 0])
    assert float(layer.routed(x)[0, 0]) == float(expert_order[0, 0])


def test_stacked_experts_share_one_copy_of_the_weights():
    layer = MoEFeedForward(256, 4, 2, 512, 64)
    layer.load_weights([(k, mx.random.normal(v.shape)) for k, v in tree_flatten(layer.parameters())])
    mx.eval(layer.parameters())
    routed = sum(v.nbytes for k, v in tree_flatten(layer.parameters()) if k.startswith("experts."))
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.eval(layer(mx.random.normal((1, 64, 256))))
    mx.clear_cache()
    assert mx.get_active_memory() - before < routed / 4  # a second copy would add all of it


def test_the_layer_has_no_debug_hook_and_no_stack_among_its_parameters():
    layer = random_layer()
    mx.eval(layer(tokens(50)))
    assert not hasattr(layer, "debug")
    assert isinstance(layer._stacks, ExpertStacks)
    assert all(k.startswith(("gate.", "experts.", "shared_experts.")) for k, _ in tree_flatten(layer.parameters()))


@pytest.mark.parametrize("num_experts,top_k,n", [(4, 2, 1), (4, 2, 333), (6, 3, 2000)])
def test_layout_gives_each_pair_a_row_of_its_token_in_a_block_of_its_expert(num_experts, top_k, n):
    rng = np.random.default_rng(n)
    # Skewed routing, and the last expert never chosen.
    probs = np.arange(1, num_experts + 1, dtype=np.float64)[::-1] ** 2
    probs[-1] = 0
    chosen = np.stack([np.sort(rng.choice(num_experts, top_k, replace=False, p=probs / probs.sum()))
                       for _ in range(n)])
    table = layout(mx.array(chosen, dtype=mx.uint32), num_experts)
    m, pairs = table.block, n * top_k
    assert m == block_rows(pairs, num_experts) and table.blocks * m < pairs + num_experts * m + m
    positions, rows = np.asarray(table.positions), np.asarray(table.rows)
    owners = np.asarray(table.block_experts)
    assert len(np.unique(positions)) == pairs  # no two pairs share a row
    assert np.array_equal(rows[positions], np.repeat(np.arange(n)[:, None], top_k, axis=1))
    assert np.array_equal(owners[positions // m], chosen)
    assert (np.diff(owners.astype(int)) >= 0).all()
    assert set(owners) <= set(np.unique(chosen))  # no block for an expert nobody chose
