"""MMRA LP: hand-solvable games, an independent LP, and a property test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from emdpo_ray.core.mmra import MatrixError, baselines, evaluate, regret_matrix, solve


def test_dominant_policy_gets_all_weight():
    """Policy 0 is as good as each type's own: L_i0 = L_ii, so regret 0 at w = e_0."""
    L = np.array([[1.0, 0.2, 0.1], [0.5, 0.5, 0.0], [0.7, 0.1, 0.7]])
    r = solve(L)
    np.testing.assert_allclose(r.weights, [1, 0, 0], atol=1e-6)
    assert r.max_regret == pytest.approx(0.0, abs=1e-7)


def test_symmetric_game_is_uniform():
    """L = I (each policy is worth 1 to its own type only): R = 1 - I, Rw = 1 - w,
    minimised by w = 1/3 each with max regret 2/3."""
    r = solve(np.eye(3))
    np.testing.assert_allclose(r.weights, [1 / 3] * 3, atol=1e-6)
    assert r.max_regret == pytest.approx(2 / 3, abs=1e-6)


def test_negative_regrets_give_zero():
    """Every policy serves every type better than its own: regrets < 0, max regret 0."""
    L = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert solve(L).max_regret == 0.0


def test_type_weights_scale_regret():
    """Two types, R = [[0, 1], [1, 0]], c = [3, 1]: minimise max(3 w1, w0) ->
    w = (3/4, 1/4), max regret 3/4."""
    r = solve(np.eye(2), [3.0, 1.0])
    np.testing.assert_allclose(r.weights, [0.75, 0.25], atol=1e-6)
    assert r.max_regret == pytest.approx(0.75, abs=1e-6)
    np.testing.assert_allclose(r.regret, [0.75, 0.75], atol=1e-6)


def scipy_optimum(L, c):
    R = c[:, None] * regret_matrix(L)
    k = len(L)
    # variables [w_0..w_k-1, t]; minimise t s.t. R w - t <= 0, sum w = 1, w >= 0, t >= 0
    res = linprog(np.r_[np.zeros(k), 1.0], A_ub=np.c_[R, -np.ones(k)], b_ub=np.zeros(k),
                  A_eq=np.r_[np.ones(k), 0.0][None], b_eq=[1.0], bounds=[(0, None)] * (k + 1),
                  method="highs")
    return res.fun


@pytest.mark.parametrize("seed", range(12))
def test_agrees_with_scipy_linprog(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    L = rng.normal(size=(k, k))
    c = rng.uniform(0.2, 3.0, size=k) if seed % 2 else np.ones(k)
    r = solve(L, c)
    assert r.max_regret == pytest.approx(scipy_optimum(L, c), abs=1e-6)
    assert r.max_regret == pytest.approx(evaluate(L, r.weights, c).max_regret, abs=1e-12)
    assert r.weights.min() >= 0 and r.weights.sum() == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5).flatmap(lambda k: st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=k, max_size=k),
    min_size=k, max_size=k)))
def test_never_worse_than_vertices_or_uniform(rows):
    L = np.array(rows)
    k = len(L)
    best = solve(L).max_regret
    for j in range(k):
        assert best <= evaluate(L, np.eye(k)[j]).max_regret + 1e-6
    assert best <= evaluate(L, np.full(k, 1 / k)).max_regret + 1e-6


@pytest.mark.parametrize("L,c,expect", [
    ([[1, 2, 3], [4, 5, 6]], None, "square"),
    ([[1, float("nan")], [0, 1]], None, "finite"),
    ([[1, 0], [0, 1]], [1, 2, 3], "type_weights: expected 2"),
    ([[1, 0], [0, 1]], [1, -1], ">= 0"),
    ([], None, "square"),
    ("abc", None, "matrix"),
])
def test_bad_matrices(L, c, expect):
    with pytest.raises(MatrixError, match=expect):
        solve(L, c)


def test_baselines_cover_uniform_eta_and_each_policy():
    b = baselines(np.eye(3), eta=[0.5, 0.3, 0.2])
    assert set(b) == {"uniform", "eta", "policy_0", "policy_1", "policy_2"}
    assert b["policy_0"]["max_regret"] == pytest.approx(1.0)
    assert b["eta"]["max_regret"] == pytest.approx(0.8)


def test_cli_matrix(tmp_path):
    import json
    import subprocess
    import sys

    f = tmp_path / "L.json"
    f.write_text(json.dumps({"L": [[1, 0], [0, 1]], "type_weights": [3, 1]}))
    p = subprocess.run([sys.executable, "-m", "emdpo_ray", "mmra", "--matrix", str(f)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    np.testing.assert_allclose(out["weights"], [0.75, 0.25], atol=1e-6)
    f.write_text(json.dumps([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    out = json.loads(subprocess.run([sys.executable, "-m", "emdpo_ray", "mmra", "--matrix",
                                     str(f)], capture_output=True, text=True).stdout)
    assert out["max_regret"] == pytest.approx(2 / 3, abs=1e-6)
    f.write_text(json.dumps({"L": [[1, 2]]}))
    p = subprocess.run([sys.executable, "-m", "emdpo_ray", "mmra", "--matrix", str(f)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "square" in p.stderr and "Traceback" not in p.stderr


def test_ties_go_to_the_most_uniform_optimum():
    """Types 0 and 1 are the same type (same rows, same columns): R = [[0,0,1],[0,0,1],[1,1,0]],
    so max(w2, w0 + w1) is minimised by w2 = 1/2 with any split of the other half; the tie
    breaks to w0 = w1 = 1/4."""
    L = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = solve(L)
    np.testing.assert_allclose(r.weights, [0.25, 0.25, 0.5], atol=1e-5)
    assert r.max_regret == pytest.approx(0.5, abs=1e-6)
    # no regret anywhere: every mixture is optimal, the answer is uniform
    np.testing.assert_allclose(solve(np.zeros((3, 3))).weights, [1 / 3] * 3, atol=1e-5)


def test_solution_follows_a_relabelling_of_types():
    rng = np.random.default_rng(5)
    L = rng.normal(size=(4, 4))
    perm = np.array([2, 0, 3, 1])
    a, b = solve(L), solve(L[np.ix_(perm, perm)])
    np.testing.assert_allclose(b.weights, a.weights[perm], atol=1e-5)
    assert b.max_regret == pytest.approx(a.max_regret, abs=1e-7)
