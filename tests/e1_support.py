"""Fixture access for the HiDream-E1 tests.

``HIDREAM_E1_FIXTURES`` points the tests at another E1 fixture set (same file formats and
folder, other dims, sizes and sources); every size, seed and prompt is read from the set.
``user_layout`` lays the set out as users download it: an I1-Full pipeline folder (the base),
an E1.1 folder holding ``transformer/``, a folder holding ``HiDream-E1-Full.safetensors``.
"""
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

FIXTURES = Path(os.environ.get("HIDREAM_E1_FIXTURES", Path(__file__).parent / "fixtures" / "e1-tiny"))
TOL = 1e-4
BASE_PARTS = ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4",
              "tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4", "vae", "transformer")
SAMPLING_CASES = ("e1_1_sampling", "e1_1_sampling_refine0", "e1_1_sampling_no_clip_cfg_norm",
                  "e1_1_sampling_swap_unaliased", "e1_full_sampling")


@lru_cache(maxsize=None)
def golden(name: str) -> dict:
    return dict(np.load(FIXTURES / f"{name}.npz"))


@lru_cache(maxsize=None)
def params() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())["params"]


def e1_1_budget() -> tuple[int, int]:
    """The E1.1 runs' --width/--height: the square budget of side ``image_size``."""
    side = int(golden("image_latents")["image_size"])
    return side, side


def e1_full_size() -> tuple[int, int]:
    """The E1-Full runs' --width/--height: the exact resize of its script (the manifest's
    ``resize_to``, else the size of the recorded resized source)."""
    resize = params().get("e1_full", {}).get("resize_to")
    if resize:
        return int(resize[0]), int(resize[1])
    h, w = golden("image_latents")["e1_full.resized_image"].shape[:2]
    return int(w), int(h)


def pixels_per_token() -> int:
    """Pixels per transformer token side: the VAE's scale times the patch size."""
    vae = json.loads((FIXTURES / "vae" / "config.json").read_text())
    transformer = json.loads((FIXTURES / "transformer" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1) * transformer["patch_size"]


def user_layout(root: Path) -> dict[str, Path]:
    """``base``, ``e1_1`` and ``e1_full`` folders under ``root``, linked to the fixture's files."""
    base, e1_1, e1_full = root / "HiDream-I1-Full", root / "HiDream-E1-1", root / "HiDream-E1-Full"
    for folder in (base, e1_1, e1_full):
        folder.mkdir(parents=True)
    for part in BASE_PARTS:
        (base / part).symlink_to((FIXTURES / part).resolve())
    (e1_1 / "transformer").symlink_to((FIXTURES / "transformer_e1_1").resolve())
    checkpoint = FIXTURES / "e1_full_lora" / "HiDream-E1-Full.safetensors"
    (e1_full / checkpoint.name).symlink_to(checkpoint.resolve())
    return {"base": base, "e1_1": e1_1, "e1_full": e1_full, "source": FIXTURES / "source.png"}


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def assert_image_close(ours, ref, levels: int, identical: float) -> None:
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= levels and (diff == 0).mean() >= identical, (diff.max(), (diff == 0).mean())
