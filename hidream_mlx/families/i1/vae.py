"""FLUX-style ``AutoencoderKL`` (HiDream-I1's VAE) in MLX: encoder and decoder.

Images in: ``encode_uint8`` (uint8 RGB -> transformer-space latents, what editing and
image-to-image start from); latents out: ``decode_latents``. Internally channels-last (NHWC);
the public ``decode``/``encode_*`` take and return NCHW like the reference. Module names match
diffusers; conv weights are stored [O, kh, kw, I].
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hidream_mlx.families.i1.config import VAEConfig

GN_EPS = 1e-6


def torch_to_mlx(name: str, shape) -> tuple:
    """Checkpoint shape -> our parameter shape (conv kernels go channels-last)."""
    shape = tuple(shape)
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape


def _norm(groups, channels):
    return nn.GroupNorm(groups, channels, eps=GN_EPS, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = _norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1)

    def __call__(self, x):
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = _norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)
        out = mx.fast.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t),
                                                   scale=1.0 / math.sqrt(c))
        return self.to_out[0](out).reshape(b, h, w, c) + x


class MidBlock(nn.Module):
    def __init__(self, channels, groups, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)]
        self.attentions = [AttnBlock(channels, groups)] if attention else []

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class Downsample(nn.Module):
    """Stride-2 conv after padding right and bottom by one (the reference's asymmetric pad)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x):
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class UpBlock(nn.Module):
    def __init__(self, c_in, c_out, layers, groups, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)]
        self.upsamplers = [Upsample(c_out)] if upsample else []

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class DownBlock(nn.Module):
    def __init__(self, c_in, c_out, layers, groups, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)]
        self.downsamplers = [Downsample(c_out)] if downsample else []

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = list(cfg.block_out_channels), cfg.norm_num_groups
        rev = chans[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention)
        self.up_blocks = [UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < len(rev) - 1)
                          for i in range(len(rev))]
        self.conv_norm_out = _norm(g, chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)
        self.debug = None

    def __call__(self, z):
        x = self.conv_in(z)
        self._dbg("conv_in", x)
        x = self.mid_block(x)
        self._dbg("mid_block", x)
        for i, up in enumerate(self.up_blocks):
            x = up(x)
            self._dbg(f"up_blocks.{i}", x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))

    def _dbg(self, name, x):
        if self.debug is not None:
            self.debug[name] = x.transpose(0, 3, 1, 2)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = list(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = [DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, g, i < len(chans) - 1)
                            for i in range(len(chans))]
        self.mid_block = MidBlock(chans[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _norm(g, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for down in self.down_blocks:
            x = down(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.use_quant_conv or cfg.use_post_quant_conv:
            raise ValueError("only the FLUX-style VAE without quant convs is supported")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def decode(self, vae_input: mx.array) -> mx.array:
        """Raw decoder output [B, 3, H, W] of a VAE-space latent [B, C, h, w]."""
        return self.decoder(vae_input.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def encode_moments(self, images: mx.array) -> tuple:
        """(mean, logvar) [B, C, h, w] of images [B, 3, H, W] in [-1, 1]."""
        out = self.encoder(images.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        mean, logvar = mx.split(out, 2, axis=1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def to_vae_space(self, latents: mx.array) -> mx.array:
        return latents / self.cfg.scaling_factor + self.cfg.shift_factor

    def to_model_space(self, vae_latents: mx.array) -> mx.array:
        return (vae_latents - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode_latents(self, latents: mx.array) -> mx.array:
        """Transformer-space latents -> float image [B, H, W, 3] in [0, 1]."""
        return mx.clip(self.decode(self.to_vae_space(latents)) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def encode_image(self, images: mx.array) -> mx.array:
        """Images [B, 3, H, W] in [-1, 1] -> transformer-space latents (the posterior mean)."""
        return self.to_model_space(self.encode_moments(images)[0])

    @property
    def scale(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode_uint8(self, image) -> mx.array:
        """uint8 RGB [H, W, 3] (or [B, H, W, 3]) -> transformer-space latents [B, C, H/s, W/s]:
        the posterior's mode (its mean, no sampling), shifted and scaled, the inverse of
        :meth:`decode_latents`' normalisation. Sides must be multiples of :attr:`scale`."""
        pixels = preprocess_uint8(image)
        height, width = pixels.shape[-2:]
        if height % self.scale or width % self.scale:
            raise ValueError(f"a {width}x{height} image cannot be encoded: the VAE takes sides that are "
                             f"multiples of {self.scale}")
        dtype = self.encoder.conv_in.weight.dtype
        return self.encode_image(mx.array(pixels).astype(dtype))


def preprocess_uint8(image) -> np.ndarray:
    """uint8 RGB HWC or BHWC -> float32 NCHW in [-1, 1]: ``2 * (x / 255) - 1`` in float32, as
    diffusers' ``VaeImageProcessor.preprocess`` computes it."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3] or [B, H, W, 3], got {pixels.dtype} "
                         f"{list(pixels.shape)}")
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    scaled = np.float32(2.0) * scaled - np.float32(1.0)
    return np.ascontiguousarray((scaled if scaled.ndim == 4 else scaled[None]).transpose(0, 3, 1, 2))


def to_uint8(image_float: mx.array) -> mx.array:
    """``round(255 x)`` (half to even, as torch.round)."""
    return mx.round(image_float * 255).astype(mx.uint8)
