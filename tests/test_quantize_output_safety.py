"""``quantize -o`` never destroys anything: the output may not be, contain or lie inside the
source; ``--overwrite`` replaces only a folder a previous conversion wrote, after the new one is
complete; folders a killed run left behind are cleaned on the next run; modes follow the umask."""

import os
import shutil
import stat

import pytest
from conftest import FIXTURES

from hidream_mlx.families.o1.convert import convert
from hidream_mlx.quant.output import PARTIAL_MARKER, clean_leftovers, is_conversion_output
from hidream_mlx.quant.recipes import get_quant_recipe

FLAT = get_quant_recipe("flat")
WEIGHTS = ("model.safetensors", "config.json")


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in (*WEIGHTS, "tokenizer.json"):
        shutil.copyfile(FIXTURES / name, src / name)
    return src


def intact(src) -> bool:
    return all((src / name).read_bytes() == (FIXTURES / name).read_bytes() for name in WEIGHTS)


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_output_touching_the_source_is_refused_and_nothing_deleted(source, where):
    out = {"is": source, "inside": source / "q4", "contains": source.parent}[where]
    with pytest.raises(ValueError, match="may not be, contain or lie inside the source"):
        convert(str(source), out, FLAT, bits=4, overwrite=True)
    assert intact(source) and not (source / "q4").exists()


def test_overwrite_refuses_a_folder_of_unrelated_files(source, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="only a folder written by hidream-mlx quantize"):
        convert(str(source), out, FLAT, bits=4, overwrite=True)
    assert (out / "holiday.jpg").read_bytes() == b"mine"


def test_overwrite_refuses_a_previous_output_someone_added_files_to(source, tmp_path):
    out = convert(str(source), tmp_path / "q8", FLAT, bits=8).output
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="only a folder written"):
        convert(str(source), out, FLAT, bits=4, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_previous_output_and_leaves_no_temp(source, tmp_path):
    out = convert(str(source), tmp_path / "q", FLAT, bits=8).output
    assert is_conversion_output(out)
    convert(str(source), out, FLAT, bits=4, overwrite=True)
    assert '"bits": 4' in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]
    assert not (out / PARTIAL_MARKER).exists()


def test_the_old_folder_survives_until_the_new_one_is_complete(source, tmp_path, monkeypatch):
    out = convert(str(source), tmp_path / "q", FLAT, bits=8).output
    before = (out / "config.json").read_text()
    import hidream_mlx.families.o1.convert as conv

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_convert_into", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(str(source), out, FLAT, bits=4, overwrite=True)
    assert (out / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]


def test_leftovers_of_a_killed_run_are_cleaned_on_the_next_run(source, tmp_path):
    out = tmp_path / "q"
    killed = tmp_path / ".q.deadbeef.partial"  # what a SIGKILL mid-conversion leaves
    killed.mkdir()
    (killed / PARTIAL_MARKER).write_text("")
    (killed / "part-00001.safetensors").write_bytes(b"half")
    stranger = tmp_path / ".q.user.partial"  # no marker: not ours, never touched
    stranger.mkdir()
    convert(str(source), out, FLAT, bits=4)
    assert not killed.exists() and stranger.is_dir()
    assert clean_leftovers(out) == []


def test_output_folder_gets_the_ordinary_umask(source, tmp_path):
    old = os.umask(0o022)
    try:
        out = convert(str(source), tmp_path / "q", FLAT, bits=4).output
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
