"""Paired differences between rows: the mean and its 95 % t-interval over seeds.

Every row shares its seeds with `none` (same data order, augmentation and initialisation), so
the seed-to-seed spread that both rows share cancels in their difference; what is left is the
method's effect plus the noise of that difference, and the t-interval says how big that is.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Paired:
    mean: float
    lo: float | None  # None with fewer than two pairs: no interval
    hi: float | None
    n: int

    @property
    def within_noise(self) -> bool:
        """The interval holds 0 (or there is none): the data cannot tell the rows apart."""
        return self.lo is None or self.hi is None or self.lo <= 0.0 <= self.hi


def paired(deltas: list[float], confidence: float = 0.95) -> Paired:
    """Mean of `deltas` and its two-sided t-interval (n - 1 degrees of freedom)."""
    if not deltas:
        raise ValueError("no paired differences")
    n = len(deltas)
    mean = statistics.fmean(deltas)
    if n < 2:
        return Paired(mean, None, None, n)
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))
    half = t * statistics.stdev(deltas) / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, n)
