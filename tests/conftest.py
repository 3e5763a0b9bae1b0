import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# Point the suite at another fixture set (same file formats, other dims and sizes) with
# HIDREAM_FIXTURES=/path/to/set; tests read every shape from the set itself.
FIXTURES = Path(os.environ.get("HIDREAM_FIXTURES", Path(__file__).parent / "fixtures" / "o1-tiny"))


def forward_cases() -> list[str]:
    """The case prefixes recorded in forward_t2i.npz (e.g. sq256, r192x320 in set A)."""
    return sorted({k.split(".")[0] for k in load_case("forward_t2i.npz").files})


def load_case(name: str):
    return np.load(FIXTURES / name)


def case_meta(name: str) -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())["files"]["_meta"][name]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model():
    from hidream_mlx.families.o1.loading import load_model

    return load_model(FIXTURES, dtype=mx.float32)
