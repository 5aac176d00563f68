"""Percentiles for the benchmarks: one definition, so every table in bench/results means the same."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolated between the two nearest samples (numpy's default); NaN
    for no samples, so an empty class shows as such instead of failing the run."""
    return float(np.percentile(values, q)) if len(values) else float("nan")
