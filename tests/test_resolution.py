"""Output sizes: official buckets (snapped like the reference) and validated free sizes."""


import numpy as np
import pytest
from conftest import FIXTURES

from hidream_mlx.families.o1.sizes import (
    MAX_PIXELS,
    OFFICIAL_BUCKETS,
    find_closest_resolution,
    resolve_size,
    validate_free_size,
)


def test_find_closest_resolution_matches_the_reference():
    utils = np.load(FIXTURES / "utils.npz")
    requests = utils["find_closest_resolution.in_wh"].tolist()
    expected = [tuple(wh) for wh in utils["find_closest_resolution.out_wh"].tolist()]
    assert [find_closest_resolution(w, h) for w, h in requests] == expected


def test_there_are_eleven_buckets_of_about_four_megapixels_on_the_patch_grid():
    assert len(OFFICIAL_BUCKETS) == 11 and OFFICIAL_BUCKETS[0] == (2048, 2048)
    for w, h in OFFICIAL_BUCKETS:
        assert w % 32 == 0 and h % 32 == 0
        assert 3.6e6 < w * h <= MAX_PIXELS
        validate_free_size(w, h)


def test_aspect_ratio_ties_go_to_the_earlier_bucket():
    # 1760/1344 is exactly as far from 4:3 as from 9:7, and 1888/1152 from 16:9 as from 3:2
    # (in float64, as the reference computes); its strict '<' scan keeps the earlier bucket.
    assert find_closest_resolution(1760, 1344) == (2304, 1728)
    assert find_closest_resolution(1888, 1152) == (2560, 1440)
    assert find_closest_resolution(500, 500) == (2048, 2048)


def test_snapping_reports_the_bucket_and_the_request():
    w, h, note = resolve_size(1024, 1024, snap=True)
    assert (w, h) == (2048, 2048)
    assert "2048x2048" in note and "snapped from 1024x1024" in note
    w, h, note = resolve_size(1440, 2560, snap=True)
    assert (w, h) == (1440, 2560) and "snapped" not in note and "official bucket" in note


def test_free_size_runs_as_asked_and_says_so():
    w, h, note = resolve_size(1024, 768, snap=False)
    assert (w, h) == (1024, 768)
    assert "1024x768" in note and "not snapped" in note


@pytest.mark.parametrize("size", [(256, 256), (2048, 2048), (3104, 1312), (1312, 3104), (2048, 2080)])
def test_free_sizes_at_the_limits_are_accepted(size):
    validate_free_size(*size)


@pytest.mark.parametrize(
    "width, height, message",
    [
        (1000, 1024, "width 1000 is not a multiple of 32"),
        (1024, 1000, "height 1000 is not a multiple of 32"),
        (224, 1024, "width 224 is below the minimum of 256"),
        (1024, 128, "height 128 is below the minimum of 256"),
        (2080, 2080, "size 2080x2080 is 4,326,400 px"),
        (4096, 1312, "above the maximum"),
    ],
)
def test_bad_free_sizes_are_refused_naming_the_value(width, height, message):
    with pytest.raises(ValueError, match=message):
        resolve_size(width, height, snap=False)


def test_snapping_needs_a_positive_size():
    with pytest.raises(ValueError, match="positive"):
        resolve_size(0, 1024, snap=True)
