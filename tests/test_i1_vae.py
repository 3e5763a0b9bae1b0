"""HiDream-I1 VAE (FLUX-style AutoencoderKL) against the PyTorch reference (vae_decode.npz),
and sanity of the encoder that editing will use."""
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hidream_mlx.families.i1.config import VAEConfig
from hidream_mlx.families.i1.vae import to_uint8
from hidream_mlx.families.i1.weights import load_vae
from hidream_mlx.weights.loading import ModelLoadError
from i1_support import FIXTURES, TOL, golden, max_abs, vae


def test_scaling_and_shift_come_from_the_config():
    g = golden("vae_decode.npz")
    model = vae()
    assert model.cfg.scaling_factor == pytest.approx(float(g["scaling_factor"]))
    assert model.cfg.shift_factor == pytest.approx(float(g["shift_factor"]))
    assert max_abs(model.to_vae_space(mx.array(g["latents"])), g["vae_input"]) < 1e-6


def test_decoder_matches_reference_with_intermediates():
    g = golden("vae_decode.npz")
    model = vae()
    model.decoder.debug = {}
    try:
        decoded = model.decode(mx.array(g["vae_input"]))
        dbg = dict(model.decoder.debug)
    finally:
        model.decoder.debug = None
    assert decoded.shape == g["decoded"].shape
    assert max_abs(decoded, g["decoded"]) < TOL
    names = [k[len("dbg.decoder."):] for k in g if k.startswith("dbg.decoder.")]
    assert names
    for name in names:
        assert max_abs(dbg[name], g[f"dbg.decoder.{name}"]) < TOL, name


def test_image_within_one_level():
    g = golden("vae_decode.npz")
    image_float = vae().decode_latents(mx.array(g["latents"]))[0]
    assert max_abs(image_float, g["image_float"]) < TOL
    diff = np.abs(np.asarray(to_uint8(image_float)).astype(int) - g["image"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_encoder_shapes_and_round_trip():
    """Encoding the decoded image lands near the latent it came from (a random VAE is no
    perfect autoencoder, so this checks shape, scale and correlation, not equality)."""
    g = golden("vae_decode.npz")
    model = vae()
    mean, logvar = model.encode_moments(mx.array(g["decoded"]))
    assert mean.shape == logvar.shape == g["vae_input"].shape
    latents = model.encode_image(mx.array(g["decoded"]))
    assert max_abs(model.to_vae_space(latents), mean) < 1e-5
    assert np.isfinite(np.asarray(latents)).all()
    back = model.to_model_space(model.to_vae_space(mx.array(g["latents"])))
    assert max_abs(back, g["latents"]) < 1e-6


def test_encoder_downsamples_non_square_images():
    cfg = vae().cfg
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    image = mx.zeros((1, cfg.in_channels, 2 * factor, 3 * factor))
    mean, _ = vae().encode_moments(image)
    assert mean.shape == (1, cfg.latent_channels, 2, 3)
    assert vae().decode(mean).shape == (1, cfg.out_channels, 2 * factor, 3 * factor)


def test_loader_is_strict(tmp_path):
    dst = tmp_path / "vae"
    dst.mkdir()
    shutil.copy(FIXTURES / "vae" / "config.json", dst / "config.json")
    tensors = load_file(FIXTURES / "vae" / "diffusion_pytorch_model.safetensors")
    tensors.pop("decoder.conv_out.bias")
    save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="decoder.conv_out.bias"):
        load_vae(dst)


def test_config_missing_key_is_named(tmp_path):
    raw = json.loads((FIXTURES / "vae" / "config.json").read_text())
    raw.pop("latent_channels")
    with pytest.raises(ModelLoadError, match="latent_channels"):
        VAEConfig.from_dict(raw, tmp_path / "config.json")
