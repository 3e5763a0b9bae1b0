#!/usr/bin/env python3
"""A real-size HiDream-I1 pipeline folder (transformer + VAE) as sparse files, all-zero weights.

The transformer has the released model's diffusers tensor names and shapes (17B parameters:
16 double + 32 single blocks, 20 heads x 128 = 2560 wide, 4 routed experts + 1 shared, 2
active, caption channels [4096, 4096], pooled width 2048, llama_layers 0..31 then 31 sixteen
times, RoPE axes [64, 32, 32], max_resolution [128, 128]) in bf16, sharded at 5 GB with a
``diffusion_pytorch_model.safetensors.index.json`` as ``save_pretrained`` writes it; the VAE is
FLUX's AutoencoderKL (channels 128/256/512/512, 16 latent channels), one bf16 file. Headers
are real, the data regions are holes: ~35 GB apparent, ~0 bytes on disk, written in seconds.
Text encoders are left out (``bench --load-only`` on I1 loads the transformer and the VAE).

Names and shapes are written out here from the diffusers module layout
(``HiDreamImageTransformer2DModel``, ``AutoencoderKL``), not taken from our modules, so a
mismatch shows up as a strict-load error; with ``--transformer-config`` and ``--vae-config``
from a fixture the tool writes that fixture's exact header (a test checks this).

usage: make_sparse_i1_checkpoint.py OUT_DIR [--from FIXTURE_DIR] [--transformer-config FILE]
                                    [--vae-config FILE] [--dtype BF16|F32] [--shard-bytes N]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
from pathlib import Path

RELEASED_TRANSFORMER = {
    "_class_name": "HiDreamImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 16, "num_single_layers": 32, "attention_head_dim": 128, "num_attention_heads": 20,
    "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 4,
    "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
    "llama_layers": list(range(32)) + [31] * 16,
}
RELEASED_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "force_upcast": True,
    "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}
ELEMENT_BYTES = {"BF16": 2, "F32": 4}


def swiglu_width(hidden: int) -> int:
    """The SwiGLU width rule: two thirds of ``hidden``, rounded up to a multiple of 256."""
    h = int(2 * hidden / 3)
    return 256 * -(-h // 256)


def linear(t: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    t[f"{name}.weight"] = [out, inp]
    if bias:
        t[f"{name}.bias"] = [out]


def swiglu(t: dict, prefix: str, dim: int, hidden: int) -> None:
    linear(t, f"{prefix}.w1", hidden, dim, bias=False)
    linear(t, f"{prefix}.w2", dim, hidden, bias=False)
    linear(t, f"{prefix}.w3", hidden, dim, bias=False)


def transformer_tensors(cfg: dict) -> dict[str, list[int]]:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, experts = cfg["patch_size"], cfg["num_routed_experts"]
    out_channels = cfg.get("out_channels") or cfg["in_channels"]
    routed, shared, text_ffn = swiglu_width(4 * d), swiglu_width(2 * d), swiglu_width(4 * d)
    t: dict[str, list[int]] = {}
    linear(t, "t_embedder.timestep_embedder.linear_1", d, 256)
    linear(t, "t_embedder.timestep_embedder.linear_2", d, d)
    linear(t, "p_embedder.pooled_embedder.linear_1", d, cfg["text_emb_dim"])
    linear(t, "p_embedder.pooled_embedder.linear_2", d, d)
    linear(t, "x_embedder.proj", d, p * p * cfg["in_channels"])
    for kind, count, chunks in (("double", cfg["num_layers"], 12), ("single", cfg["num_single_layers"], 6)):
        for i in range(count):
            b = f"{kind}_stream_blocks.{i}.block"
            linear(t, f"{b}.adaLN_modulation.1", chunks * d, d)
            for suffix in ("", "_t") if kind == "double" else ("",):
                for proj in ("to_q", "to_k", "to_v", "to_out"):
                    linear(t, f"{b}.attn1.{proj}{suffix}", d, d)
                t[f"{b}.attn1.q_rms_norm{suffix}.weight"] = [d]
                t[f"{b}.attn1.k_rms_norm{suffix}.weight"] = [d]
            t[f"{b}.ff_i.gate.weight"] = [experts, d]
            for e in range(experts):
                swiglu(t, f"{b}.ff_i.experts.{e}", d, routed)
            swiglu(t, f"{b}.ff_i.shared_experts", d, shared)
            if kind == "double":
                swiglu(t, f"{b}.ff_t", d, text_ffn)
    linear(t, "final_layer.adaLN_modulation.1", 2 * d, d)
    linear(t, "final_layer.linear", p * p * out_channels, d)
    t5_width, llama_width = cfg["caption_channels"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    for i in range(blocks):
        linear(t, f"caption_projection.{i}.linear", d, llama_width, bias=False)
    linear(t, f"caption_projection.{blocks}.linear", d, t5_width, bias=False)
    return t


def conv(t: dict, name: str, out: int, inp: int, k: int) -> None:
    t[f"{name}.weight"] = [out, inp, k, k]
    t[f"{name}.bias"] = [out]


def norm(t: dict, name: str, ch: int) -> None:
    t[f"{name}.weight"] = [ch]
    t[f"{name}.bias"] = [ch]


def resnet(t: dict, name: str, cin: int, cout: int) -> None:
    norm(t, f"{name}.norm1", cin)
    conv(t, f"{name}.conv1", cout, cin, 3)
    norm(t, f"{name}.norm2", cout)
    conv(t, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        conv(t, f"{name}.conv_shortcut", cout, cin, 1)


def mid_block(t: dict, name: str, ch: int, attention: bool) -> None:
    resnet(t, f"{name}.resnets.0", ch, ch)
    if attention:
        a = f"{name}.attentions.0"
        norm(t, f"{a}.group_norm", ch)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(t, f"{a}.{proj}", ch, ch)
    resnet(t, f"{name}.resnets.1", ch, ch)


def vae_tensors(cfg: dict) -> dict[str, list[int]]:
    ch, per, latent = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    attention = cfg.get("mid_block_add_attention", True)
    t: dict[str, list[int]] = {}
    conv(t, "encoder.conv_in", ch[0], cfg["in_channels"], 3)
    for i, cout in enumerate(ch):
        cin = ch[i - 1] if i else ch[0]
        for j in range(per):
            resnet(t, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < len(ch) - 1:
            conv(t, f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
    mid_block(t, "encoder.mid_block", ch[-1], attention)
    norm(t, "encoder.conv_norm_out", ch[-1])
    conv(t, "encoder.conv_out", 2 * latent, ch[-1], 3)
    if cfg.get("use_quant_conv", True):
        conv(t, "quant_conv", 2 * latent, 2 * latent, 1)
    if cfg.get("use_post_quant_conv", True):
        conv(t, "post_quant_conv", latent, latent, 1)
    up = ch[::-1]
    conv(t, "decoder.conv_in", up[0], latent, 3)
    mid_block(t, "decoder.mid_block", up[0], attention)
    for i, cout in enumerate(up):
        cin = up[i - 1] if i else up[0]
        for j in range(per + 1):
            resnet(t, f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < len(up) - 1:
            conv(t, f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
    norm(t, "decoder.conv_norm_out", ch[0])
    conv(t, "decoder.conv_out", cfg["out_channels"], ch[0], 3)
    return t


def write_sparse(path: Path, tensors: list[tuple[str, list[int]]], dtype: str) -> int:
    """One safetensors file whose data region is a hole (reads back as zeros); returns data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = ELEMENT_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def write_component(folder: Path, config: dict, tensors: dict[str, list[int]], dtype: str,
                    shard_bytes: int | None, stem: str = "diffusion_pytorch_model") -> int:
    """config.json plus ``STEM.safetensors``, or, when the tensors (in the given order) exceed
    ``shard_bytes``, shards ``STEM-0000k-of-0000n.safetensors`` with ``STEM.safetensors.index.json``
    (as save_pretrained)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    groups, current, size = [], [], 0
    for name, shape in tensors.items():
        n = ELEMENT_BYTES[dtype] * math.prod(shape)
        if current and shard_bytes is not None and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    if len(groups) == 1:
        return write_sparse(folder / f"{stem}.safetensors", groups[0], dtype)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        file = f"{stem}-{k:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse(folder / file, group, dtype)
        weight_map.update({name: file for name, _ in group})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--from", dest="fixture", type=Path, default=None,
                    help="a pipeline folder whose model_index.json and scheduler configs are copied")
    ap.add_argument("--transformer-config", type=Path, default=None, help="instead of the released config")
    ap.add_argument("--vae-config", type=Path, default=None, help="instead of FLUX's VAE config")
    ap.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="BF16")
    ap.add_argument("--shard-bytes", type=int, default=5 * 10**9, help="0: one file")
    args = ap.parse_args(argv)
    tcfg = json.loads(args.transformer_config.read_text()) if args.transformer_config else RELEASED_TRANSFORMER
    vcfg = json.loads(args.vae_config.read_text()) if args.vae_config else RELEASED_VAE
    args.out.mkdir(parents=True, exist_ok=False)
    index = {"_class_name": "HiDreamImagePipeline", "transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if args.fixture is not None:
        index["scheduler"] = json.loads((args.fixture / "model_index.json").read_text())["scheduler"]
        for folder in args.fixture.glob("scheduler*"):
            shutil.copytree(folder, args.out / folder.name)
    (args.out / "model_index.json").write_text(json.dumps(index, indent=2))
    t = write_component(args.out / "transformer", tcfg, dict(sorted(transformer_tensors(tcfg).items())),
                        args.dtype, args.shard_bytes or None)
    v = write_component(args.out / "vae", vcfg, dict(sorted(vae_tensors(vcfg).items())), args.dtype, None)
    params = sum(math.prod(s) for s in transformer_tensors(tcfg).values())
    print(f"{args.out}: transformer {params / 1e9:.2f}B parameters, {t / 2**30:.2f} GiB; "
          f"vae {v / 2**20:.0f} MiB ({args.dtype}, sparse)")


if __name__ == "__main__":
    main()
