"""What the experiments share: running inside their output directory, and mean ± spread over seeds."""

from __future__ import annotations

import math
import os
import statistics
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def inside(directory: Path):
    """Run with ``directory`` as the working directory (an experiment YAML's relative paths point into it)."""
    directory.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the values that are not NaN; the spread is NaN for one value."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else float("nan")
