"""The README's Python example runs as printed, on both families' tiny models (only the model, the
size, the dtype and the output path are swapped for the fixture's)."""

import re
from pathlib import Path

import pytest
from conftest import FIXTURES as O1_FIXTURES
from i1_support import FIXTURES as I1_FIXTURES

from hidream_mlx.images import read_metadata

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("- The library is usable from Python")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_example_uses_only_the_family_interface():
    code = readme_example()
    assert "from hidream_mlx.families import family_of" in code
    assert "families.o1" not in code and "families.i1" not in code


@pytest.mark.parametrize("model,family", [(O1_FIXTURES, "o1"), (I1_FIXTURES, "i1")])
def test_the_readme_python_example_makes_an_image(model, family, tmp_path):
    code = readme_example()
    swaps = [(r'model = "[^"]+"', f"model = {str(model)!r}"),
             (r"width=1024, height=1024", "width=256, height=256, steps=2"),
             (r'\{"dtype": "bfloat16", "bits": 8\}', '{"dtype": "float32"}'),
             (r'"fox.png"', repr(str(tmp_path / "fox.png")))]
    for pattern, replacement in swaps:
        code, count = re.subn(pattern, replacement, code)
        assert count == 1, pattern  # the README still reads as this test expects
    exec(compile(code, "README.md", "exec"), {"print": lambda *a, **k: None})
    meta = read_metadata(tmp_path / "fox.png")
    assert meta["family"] == family and meta["prompt"] == "a red fox" and meta["seed"] == 42
