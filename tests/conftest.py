import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "o1-tiny"


def load_case(name: str):
    return np.load(FIXTURES / name)


def case_meta(name: str) -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())["files"]["_meta"][name]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model():
    from hidream_mlx.loading import load_model

    return load_model(FIXTURES, dtype=mx.float32)
