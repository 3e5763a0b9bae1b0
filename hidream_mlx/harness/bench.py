"""``bench --load-only``: load what a family keeps resident while sampling, and measure the load.

The step benchmarks on random weights belong to each family (``Family.bench``); this module only
times a real load and reads the process high-water mark, the same way for every family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from hidream_mlx.families import family_of
from hidream_mlx.memory import ru_maxrss_bytes
from hidream_mlx.weights.precision import check_precision


@dataclass(frozen=True)
class LoadResult:
    seconds: float
    peak_rss: int  # ru_maxrss after the load: the process high-water mark, not a sample
    weight_bytes: int
    quantization: Optional[dict]


def run_load(model_arg: str, bits: Optional[int] = None, dtype: str = "bfloat16") -> LoadResult:
    """Load what text-to-image ``generate`` keeps resident while sampling, every weight evaluated
    (``Family.resident_weights``: O1's transformer without the vision tower; I1's transformer and VAE)."""
    check_precision(dtype)
    start = time.perf_counter()
    family = family_of(model_arg)
    source = family.resolve(model_arg)
    weight_bytes, quantization = family.resident_weights(source, {"dtype": dtype, "bits": bits})
    seconds = time.perf_counter() - start
    return LoadResult(seconds, ru_maxrss_bytes(), weight_bytes, quantization)


def load_line(result: LoadResult) -> str:
    """``bench --load-only``'s last stdout line; scripts parse it."""
    gib = 2 ** 30
    return (f"load {result.seconds:.1f} s, peak RSS {result.peak_rss / gib:.2f} GiB, "
            f"weights {result.weight_bytes / gib:.2f} GiB")
