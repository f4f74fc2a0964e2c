"""Figures over seeds for the studies' pages: a mean with its Student-t interval."""

from __future__ import annotations

import math

import numpy as np


def t_interval(values, level: float = 0.95) -> list[float]:
    """[mean, low, high] of the values that are not None, the interval from Student's t with
    n - 1 degrees of freedom (seeds are few, so the normal quantile would be too narrow).
    With one value the bounds are nan; with none, all three are."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], float)
    if len(v) == 0:
        return [math.nan] * 3
    mean = float(v.mean())
    if len(v) < 2:
        return [mean, math.nan, math.nan]
    h = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return [mean, mean - h, mean + h]
