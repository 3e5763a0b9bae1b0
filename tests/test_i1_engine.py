"""I1Engine's phases when nobody planned the run (server), when everything stays resident, and when
a long run's embeddings are encoded in groups."""

import numpy as np
import pytest

from hidream_mlx.families.i1 import engine as engine_module
from hidream_mlx.families.i1 import phases
from hidream_mlx.families.i1.engine import I1Engine
from hidream_mlx.families.i1.text_encoding import TextEncoders
from hidream_mlx.requests import build_request
from i1_support import FIXTURES, golden

PROMPTS = ("a red fox", "a blue bird", "a green frog")


@pytest.fixture()
def counted(monkeypatch):
    """Counts of encoder loads (by name), encode calls and transformer loads."""
    counts = {"encode": 0, "transformer": 0, "encoders": {}}
    real_model, real_encode, real_load = TextEncoders.model, TextEncoders.encode, engine_module.load_transformer_planned

    def model(self, name):
        if name not in self._models:
            counts["encoders"][name] = counts["encoders"].get(name, 0) + 1
        return real_model(self, name)

    def encode(self, texts):
        counts["encode"] += 1
        return real_encode(self, texts)

    def load(*args, **kwargs):
        counts["transformer"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(TextEncoders, "model", model)
    monkeypatch.setattr(TextEncoders, "encode", encode)
    monkeypatch.setattr(engine_module, "load_transformer_planned", load)
    return counts


def requests(engine, prompts=PROMPTS):
    c = golden("fast_sampling.npz")
    return [build_request(engine, prompt=p, seed=1, width=int(c["width"]), height=int(c["height"]), no_snap=True,
                          recipe="fast", steps=1) for p in prompts]


def test_unplanned_runs_drop_the_transformer_to_encode_a_new_prompt(counted):
    engine = I1Engine.load(FIXTURES, dtype="float32")
    for request in requests(engine):
        engine.run(request)
        assert not engine.encoders._models  # every encoder freed again
    assert counted["encode"] == 3 and counted["transformer"] == 3
    engine.run(requests(engine)[-1])  # the last prompt is still encoded and the transformer resident
    assert counted["encode"] == 3 and counted["transformer"] == 3


def test_keep_loaded_keeps_encoders_and_transformer_resident(counted):
    engine = I1Engine.load(FIXTURES, dtype="float32")
    engine.keep_loaded = True
    for request in requests(engine):
        engine.run(request)
    assert counted["transformer"] == 1 and set(counted["encoders"].values()) == {1}
    assert len(counted["encoders"]) == 4


def test_a_run_beyond_the_embedding_budget_encodes_in_groups_with_the_same_images(counted, monkeypatch):
    planned = I1Engine.load(FIXTURES, dtype="float32")
    jobs = requests(planned)
    planned.encode_prompts(jobs)
    whole = [planned.run(r).image for r in jobs]
    assert (counted["encode"], counted["transformer"]) == (1, 1)

    grouped = I1Engine.load(FIXTURES, dtype="float32")
    monkeypatch.setattr(phases, "EMBEDDING_BUDGET", 2 * grouped._text_bytes())
    grouped.encode_prompts(jobs)
    images = [grouped.run(r).image for r in jobs]
    assert (counted["encode"], counted["transformer"]) == (1 + 2, 1 + 2)  # [fox, bird], then [frog]
    for a, b in zip(whole, images):
        np.testing.assert_array_equal(a, b)
