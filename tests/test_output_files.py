"""Outputs: only regular files are replaced, partial files never linger, every format carries the recipe,
and every input image becomes the picture a viewer shows."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hidream_mlx.files import atomic_output, check_output_path, partial_path
from hidream_mlx.images import open_rgb, read_metadata, save_image

META = {"prompt": "a fox", "seed": 7, "recipe": "dev", "tool_version": "0"}


def _image():
    return (np.arange(32 * 48 * 3) % 251).astype(np.uint8).reshape(32, 48, 3)


def test_a_device_node_is_never_replaced_even_with_overwrite():
    with pytest.raises(FileExistsError, match="not a regular file"):
        check_output_path("/dev/full", overwrite=True)


def test_a_dangling_symlink_counts_as_existing(tmp_path):
    link = tmp_path / "out.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(FileExistsError):
        check_output_path(link)
    with pytest.raises(FileExistsError, match="symbolic link"):
        check_output_path(link, overwrite=True)
    assert link.is_symlink() and not (tmp_path / "nowhere.png").exists()


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path, overwrite=True)


def test_an_existing_file_needs_overwrite(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_image(_image(), target, META)
    assert target.read_bytes() == b"mine"
    save_image(_image(), target, META, overwrite=True)
    assert read_metadata(target)["seed"] == 7


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_partial_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    target = tmp_path / "out.png"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = partial_path(target, int(dead.stdout))
    stale.write_bytes(b"half-written by a SIGKILLed run")
    save_image(_image(), target, META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_partial_files_of_a_live_run_are_left_alone(tmp_path):
    target = tmp_path / "out.png"
    live = partial_path(target, os.getppid())
    live.write_bytes(b"another process is still writing")
    save_image(_image(), target, META)
    assert live.exists()


def test_outputs_get_the_ordinary_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_image(_image(), tmp_path / "out.png", META)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name,fmt", [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.jpeg", "JPEG"), ("a.webp", "WEBP")])
def test_each_format_is_written_as_its_extension_says_and_carries_the_metadata(tmp_path, name, fmt):
    meta = {**META, "prompt": "un renard, 狐"}
    path = save_image(_image(), tmp_path / name, meta)
    with Image.open(path) as im:
        assert im.format == fmt
    assert read_metadata(path) == meta


def test_webp_is_lossless_by_default_and_png_always(tmp_path):
    for name in ("a.png", "a.webp"):
        path = save_image(_image(), tmp_path / name, META)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), _image())


def test_an_unknown_extension_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unsupported image extension"):
        save_image(_image(), tmp_path / "a.tiff", META)
    assert list(tmp_path.iterdir()) == []


def test_an_image_without_our_metadata_says_so(tmp_path):
    Image.fromarray(_image()).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no hidream-mlx metadata"):
        read_metadata(tmp_path / "plain.png")


def _save(tmp_path, image, name="in.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
    values = np.full((8, 8), 32768, np.uint16)
    path = _save(tmp_path, Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_rgb(path))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1


def test_float_grey_in_unit_range_is_scaled(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.full((8, 8), 0.5, np.float32), "F"), "in.tiff")
    assert abs(int(np.asarray(open_rgb(path))[0, 0, 1]) - 128) <= 1


def test_transparency_is_composited_over_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    assert np.asarray(open_rgb(_save(tmp_path, la))).min() == 255
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert np.asarray(open_rgb(_save(tmp_path, pal, "p.png", transparency=0))).min() == 255


def test_cmyk_and_exif_rotation_give_what_a_viewer_shows(tmp_path):
    cmyk = Image.new("CMYK", (4, 2), (0, 255, 255, 0))  # red
    r, g, b = np.asarray(open_rgb(_save(tmp_path, cmyk, "c.jpg")))[0, 0]
    assert r > 200 and g < 60 and b < 60
    wide = Image.new("RGB", (6, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = open_rgb(_save(tmp_path, wide, "r.jpg", exif=exif.tobytes()))
    assert rotated.size == (2, 6)


def test_unreadable_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        open_rgb(bad)
    with pytest.raises(ValueError, match="missing.png: image not found"):
        open_rgb(tmp_path / "missing.png")
