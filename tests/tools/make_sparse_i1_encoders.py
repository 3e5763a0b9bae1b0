#!/usr/bin/env python3
"""The four real-size HiDream-I1 text encoders as sparse files (all-zero weights), added to a
pipeline folder (for example one ``make_sparse_i1_checkpoint.py`` wrote).

Writes ``text_encoder/`` (Long-CLIP-L: 12 layers, width 768, 248 positions, projection 768),
``text_encoder_2/`` (Long-CLIP-G: 32 layers, width 1280, projection 1280), ``text_encoder_3/``
(T5-XXL encoder: 24 blocks, d_model 4096, 64 heads x 64, gated-gelu d_ff 10240) and
``text_encoder_4/`` (Llama-3.1-8B-Instruct: 32 layers, width 4096, 32/8 heads x 128, MLP 14336,
vocab 128256, ``lm_head`` included as the release stores it), with the transformers tensor
names and bf16 dtype of the released files, sharded at 5 GB like ``save_pretrained``. Headers
are real, the data regions are holes (~26 GB apparent, ~0 bytes on disk). The tokenizer folders
are copied from ``--from`` (a tiny fixture's synthetic tokenizers: enough to load, not to read
real prompts). Used to measure the encode phase's memory at real scale.

usage: make_sparse_i1_encoders.py PIPELINE_DIR --from FIXTURE_DIR [--dtype BF16|F32]
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

# The sparse-file writer is the transformer tool's, beside this file (however this one is loaded).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sparse_i1_checkpoint import ELEMENT_BYTES, write_component  # noqa: E402

SHARD_BYTES = 5 * 10**9
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "projection_dim": 1280, "hidden_act": "gelu"}
CLIP_COMMON = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
               "vocab_size": 49408, "max_position_embeddings": 248, "layer_norm_eps": 1e-5, "bos_token_id": 0,
               "eos_token_id": 2, "pad_token_id": 1}
T5_XXL = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_kv": 64,
          "d_ff": 10240, "num_heads": 64, "num_layers": 24, "feed_forward_proj": "gated-gelu",
          "dense_act_fn": "gelu_new", "is_gated_act": True, "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "pad_token_id": 0,
          "eos_token_id": 1, "tie_word_embeddings": False}
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def clip_tensors(cfg: dict) -> dict[str, list[int]]:
    d, f, v, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]
    t = {"text_model.embeddings.token_embedding.weight": [v, d],
         "text_model.embeddings.position_embedding.weight": [p, d],
         "text_model.final_layer_norm.weight": [d], "text_model.final_layer_norm.bias": [d],
         "text_projection.weight": [cfg["projection_dim"], d]}
    for i in range(cfg["num_hidden_layers"]):
        b = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[b + f"self_attn.{proj}.weight"], t[b + f"self_attn.{proj}.bias"] = [d, d], [d]
        for norm in ("layer_norm1", "layer_norm2"):
            t[b + f"{norm}.weight"], t[b + f"{norm}.bias"] = [d], [d]
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = [f, d], [f]
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = [d, f], [d]
    return t


def t5_tensors(cfg: dict) -> dict[str, list[int]]:
    d, inner, f = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    t = {"shared.weight": [cfg["vocab_size"], d], "encoder.final_layer_norm.weight": [d],
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
             [cfg["relative_attention_num_buckets"], cfg["num_heads"]]}
    for i in range(cfg["num_layers"]):
        b = f"encoder.block.{i}.layer."
        for proj in ("q", "k", "v"):
            t[b + f"0.SelfAttention.{proj}.weight"] = [inner, d]
        t[b + "0.SelfAttention.o.weight"] = [d, inner]
        t[b + "0.layer_norm.weight"] = [d]
        t[b + "1.DenseReluDense.wi_0.weight"] = [f, d]
        t[b + "1.DenseReluDense.wi_1.weight"] = [f, d]
        t[b + "1.DenseReluDense.wo.weight"] = [d, f]
        t[b + "1.layer_norm.weight"] = [d]
    return t


def llama_tensors(cfg: dict) -> dict[str, list[int]]:
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": [cfg["vocab_size"], d], "model.norm.weight": [d],
         "lm_head.weight": [cfg["vocab_size"], d]}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        t[b + "self_attn.q_proj.weight"], t[b + "self_attn.o_proj.weight"] = [q, d], [d, q]
        t[b + "self_attn.k_proj.weight"], t[b + "self_attn.v_proj.weight"] = [kv, d], [kv, d]
        t[b + "mlp.gate_proj.weight"], t[b + "mlp.up_proj.weight"] = [f, d], [f, d]
        t[b + "mlp.down_proj.weight"] = [d, f]
        t[b + "input_layernorm.weight"], t[b + "post_attention_layernorm.weight"] = [d], [d]
    return t


ENCODERS = {
    "text_encoder": ({**CLIP_COMMON, **CLIP_L}, clip_tensors),
    "text_encoder_2": ({**CLIP_COMMON, **CLIP_G}, clip_tensors),
    "text_encoder_3": (T5_XXL, t5_tensors),
    "text_encoder_4": (LLAMA_8B, llama_tensors),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", type=Path, help="the pipeline folder to add the encoders to")
    ap.add_argument("--from", dest="fixture", type=Path, required=True, help="a folder with tokenizer*/ to copy")
    ap.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="BF16")
    args = ap.parse_args(argv)
    args.pipeline.mkdir(parents=True, exist_ok=True)
    for folder in sorted(args.fixture.glob("tokenizer*")):
        shutil.copytree(folder, args.pipeline / folder.name)
    for name, (config, tensors_of) in ENCODERS.items():
        tensors = tensors_of(config)
        nbytes = write_component(args.pipeline / name, {**config, "torch_dtype": "bfloat16"}, tensors, args.dtype,
                                 SHARD_BYTES, stem="model")
        params = sum(math.prod(s) for s in tensors.values())
        print(f"{args.pipeline / name}: {params / 1e9:.3f}B parameters, {nbytes / 2**30:.2f} GiB ({args.dtype}, sparse)")


if __name__ == "__main__":
    main()
