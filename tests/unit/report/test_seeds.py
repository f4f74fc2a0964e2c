"""Mean and t-interval over seeds (report/seeds.py), worked by hand."""

import math

import pytest

from emdpo_ray.report.seeds import t_interval


def test_t_interval_by_hand():
    # 1, 2, 3: mean 2, sd 1, standard error 1/sqrt(3); t(0.975, 2 dof) = 4.3027
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    h = 4.302653 / math.sqrt(3)
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - h, abs=1e-5) and hi == pytest.approx(2.0 + h, abs=1e-5)
    # a 90% interval is narrower: t(0.95, 2 dof) = 2.9200
    _, lo90, hi90 = t_interval([1.0, 2.0, 3.0], level=0.90)
    assert hi90 - lo90 == pytest.approx(2 * 2.919986 / math.sqrt(3), abs=1e-5)


def test_t_interval_skips_missing_and_needs_two():
    assert t_interval([None, 4.0, None, 6.0])[0] == 5.0
    mean, lo, hi = t_interval([0.5, None])
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in t_interval([None]))
    # equal values: no spread, no width
    assert t_interval([0.8, 0.8, 0.8]) == [pytest.approx(0.8)] * 3
