"""Min-max regret aggregation (MMRA): mixture weights over the K policies (pure functions).

    R_ij = L_ii - L_ij                      regret of type i when served by policy j
    w*   = argmin_{w in simplex} max(0, max_i c_i sum_j w_j R_ij)

`L_ij` is type i's mean log-ratio reward of policy j's generations. The game is solved
exactly as a linear program with cvxpy (CLARABEL, falling back to HIGHS). When several
mixtures reach the optimum (ties, e.g. two types with the same policy), the one closest to
uniform is returned: a strictly convex second stage, so the answer is unique and does not
depend on the solver's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MatrixError(ValueError):
    """The L matrix or the type weights are unusable."""


@dataclass
class MMRAResult:
    weights: np.ndarray   # [K] on the simplex
    regret: np.ndarray    # [K] c_i * (R w)_i per type
    max_regret: float     # max(0, max_i regret_i), what `weights` achieve

    def to_json(self) -> dict:
        return {"weights": self.weights.tolist(), "max_regret": self.max_regret,
                "regret": self.regret.tolist()}


def check_matrix(L, type_weights=None) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray(L, dtype=float)
    except (TypeError, ValueError):
        raise MatrixError("L: expected a square matrix of numbers (a list of equal-length "
                          "rows)") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise MatrixError(f"L: expected a non-empty square matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MatrixError("L: every entry must be finite (no NaN or infinity)")
    k = arr.shape[0]
    if type_weights is None:
        c = np.ones(k)
    else:
        try:
            c = np.asarray(type_weights, dtype=float)
        except (TypeError, ValueError):
            raise MatrixError("type_weights: expected a list of numbers") from None
        if c.shape != (k,):
            raise MatrixError(f"type_weights: expected {k} numbers (one per type), got shape "
                              f"{c.shape}")
        if not np.isfinite(c).all() or (c < 0).any():
            raise MatrixError("type_weights: every weight must be finite and >= 0")
    return arr, c


def regret_matrix(L: np.ndarray) -> np.ndarray:
    L = np.asarray(L, dtype=float)
    return np.diag(L)[:, None] - L


def evaluate(L, weights, type_weights=None) -> MMRAResult:
    """Per-type regret and max regret that a given mixture achieves."""
    arr, c = check_matrix(L, type_weights)
    w = np.asarray(weights, dtype=float)
    regret = c * (regret_matrix(arr) @ w)
    return MMRAResult(w, regret, float(max(0.0, regret.max())))


def _solve(problem, var, solvers: tuple[str, ...]) -> np.ndarray:
    import cvxpy as cp

    for solver in solvers:
        try:
            problem.solve(solver=solver)
        except cp.error.SolverError:
            continue
        if problem.status in ("optimal", "optimal_inaccurate") and var.value is not None:
            return np.asarray(var.value, dtype=float)
    raise RuntimeError(f"MMRA program did not solve (status {problem.status})")


def solve(L, type_weights=None) -> MMRAResult:
    """Exact min-max regret weights via an LP; ties broken towards the uniform mixture."""
    import cvxpy as cp

    arr, c = check_matrix(L, type_weights)
    k = arr.shape[0]
    R = c[:, None] * regret_matrix(arr)
    w, t = cp.Variable(k), cp.Variable()
    simplex = [w >= 0, cp.sum(w) == 1]
    first = _normalise(_solve(cp.Problem(cp.Minimize(t), [*simplex, t >= 0, R @ w <= t]), w,
                              ("CLARABEL", "HIGHS")))
    t_star = max(0.0, float((R @ first).max()))  # achieved by `first`: stage two is feasible
    # Second stage: among mixtures reaching the optimum, the closest to uniform (strictly
    # convex, so unique). Kept only if it is no worse than the first within 1e-9.
    tol = 1e-9 * (1.0 + float(np.abs(R).max()))
    tie = cp.Problem(cp.Minimize(cp.sum_squares(w - 1.0 / k)), [*simplex, R @ w <= t_star + tol])
    try:
        second = _normalise(_solve(tie, w, ("CLARABEL",)))
    except RuntimeError:
        second = first
    best = second if max(0.0, float((R @ second).max())) <= t_star + tol else first
    return evaluate(arr, best, c)


def _normalise(w: np.ndarray) -> np.ndarray:
    w = np.clip(w, 0.0, None)
    return w / w.sum()


def baselines(L, eta=None, type_weights=None) -> dict:
    """Regret of the mixtures a user would try instead: uniform, eta-weighted, each policy."""
    arr, c = check_matrix(L, type_weights)
    k = arr.shape[0]
    out = {"uniform": evaluate(arr, np.full(k, 1.0 / k), c).to_json()}
    if eta is not None:
        out["eta"] = evaluate(arr, np.asarray(eta, float), c).to_json()
    for j in range(k):
        out[f"policy_{j}"] = evaluate(arr, np.eye(k)[j], c).to_json()
    return out
