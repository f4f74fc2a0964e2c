"""The start's cheap stand-in for the policies: a mixture of *linear* Plackett-Luce models
r_k = x . theta_k on per-response features, fitted by EM with L-BFGS M-steps, from several
starts (k-means on per-user preference embeddings, then random partitions), then improved by
split-and-merge moves. No language model; train/start.py chooses its features and penalty.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from emdpo_ray.core.estep import e_step, smoothed_onehot, user_loglik

SHORT_RUN = 5   # iterations of each start before the likeliest runs on


def rank_weighted(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, V]: each record's sum_j c_j x_j, c linear from +1 (best) to -1 (worst)."""
    c = np.zeros(mask.shape)
    for i, m in enumerate(mask.sum(1)):
        c[i, :m] = np.linspace(1.0, -1.0, m)
    return np.einsum("nm,nmv->nv", c, x)


def preference_embeddings(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray,
                          num_users: int) -> np.ndarray:
    """[U, V]: per-user mean of rank_weighted."""
    emb = np.zeros((num_users, x.shape[-1]))
    np.add.at(emb, user_index, rank_weighted(x, mask))
    return emb / np.maximum(np.bincount(user_index, minlength=num_users), 1)[:, None]


def kmeans_labels(emb: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    if k == 1:
        return np.zeros(len(emb), dtype=int)
    return KMeans(n_clusters=k, n_init=20, random_state=seed).fit_predict(normalize(emb))


@dataclass
class LinearMixture:
    theta: np.ndarray   # [K, V] reward weights per type
    eta: np.ndarray     # [K] mixing weights
    gamma: np.ndarray   # [U, K] posteriors


def pl_logp_grad(r: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log P [B], d log P / d r [B, m]) of each row's order (best first) under Plackett-Luce
    (core/losses.py), r [B, m] float64, padding (mask False) at a row's end. With
    e_l = exp(r_l - max r) and S_j = sum_{l>=j} e_l: log P = sum_j (r_j - max r - log S_j),
    d log P / d r_l = 1 - e_l sum_{j<=l} 1/S_j: the chosen response's pull minus its share of
    every stage it competed in. Suffix and prefix sums, a few passes over [B, m] (the start's
    hot loop); a stage whose S_j underflows (its responses all ~700 nats below the row's
    best) goes to the log-space form."""
    # stages as rows [m, B]: numpy reduces a short last axis slowly, whole rows fast
    mt = np.ascontiguousarray(mask.T)
    z = np.where(mt, r.T, -np.inf)
    top = z[0].copy()  # the best response is real
    for j in range(1, len(z)):
        np.maximum(top, z[j], out=top)
    z -= top
    e = np.exp(z)
    s = e.copy()
    for j in range(len(s) - 2, -1, -1):
        s[j] += s[j + 1]
    s = np.where(mt, s, 1.0)  # padding: log 1 = 0, 1/1 dropped below
    if s.min() <= 1e-300:
        return pl_logp_grad_logspace(r, mask)
    logp = np.where(mt, z - np.log(s), 0.0).sum(0)
    inv = np.where(mt, 1.0 / s, 0.0)
    for j in range(1, len(inv)):
        inv[j] += inv[j - 1]
    return logp, (mt - e * inv).T


def pl_logp_grad_logspace(r: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pl_logp_grad by log-sum-exp tails, exact at any scale (and 5x slower)."""
    m = r.shape[1]
    r = np.where(mask, r, -1e9)  # finite padding, as core/losses.py: no inf - inf
    tail = r.copy()  # a column at a time: m is small, ufunc.accumulate is slower
    for j in range(m - 2, -1, -1):
        np.logaddexp(r[:, j], tail[:, j + 1], out=tail[:, j])
    logp = ((r - tail) * mask).sum(1)
    # share[b, j, l] = exp(r_l - tail_j): response l's probability at stage j, for l >= j
    # (<= 0 there; clipped so the entries l < j, dropped, cannot overflow)
    share = np.exp(np.minimum(r[:, None, :] - tail[:, :, None], 0.0))
    share *= np.triu(np.ones((m, m)))
    return logp, mask - np.einsum("bj,bjl->bl", mask.astype(float), share)


def floating(x: np.ndarray) -> np.ndarray:
    """x as is when float32 or float64, else float64: the matmuls run in x's dtype, and
    integer counts must not cast theta to integers."""
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def linear_logliks(x: np.ndarray, mask: np.ndarray, theta: np.ndarray,
                   grad: bool = False):
    """[N, K] Plackett-Luce log-likelihood of each record's ranking under r_k = x . theta_k
    (x [N, m, V], theta [K, V]); with `grad`, also d/d r [N, K, m]. One matmul in x's dtype
    (float32: half the memory traffic of the start's hot loop), the rest in float64 closed
    forms, no autograd."""
    x = floating(x)
    n, m, v = x.shape
    k = len(theta)
    r = (x.reshape(n * m, v) @ theta.T.astype(x.dtype)).astype(np.float64)
    r = r.reshape(n, m, k).transpose(0, 2, 1).reshape(n * k, m)
    logp, g = pl_logp_grad(r, np.repeat(mask, k, 0))
    return (logp.reshape(n, k), g.reshape(n, k, m)) if grad else logp.reshape(n, k)


def record_logliks(x: np.ndarray, mask: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """linear_logliks without the gradient, as float64."""
    return linear_logliks(x, mask.astype(bool, copy=False), np.asarray(theta, np.float64))


def weighted_objective(x: np.ndarray, mask: np.ndarray, w: np.ndarray, theta: np.ndarray,
                       l2: float) -> tuple[float, np.ndarray]:
    """The start's M-step objective and its gradient in theta [K, V]:
    -sum_{n,k} w_nk log PL(ranking_n | x_n . theta_k) / N + l2 |theta|^2; w [N, K]."""
    x = floating(x)
    n, m, v = x.shape
    logp, g = linear_logliks(x, mask, theta, grad=True)
    pull = (w[:, :, None] * g).transpose(1, 0, 2).reshape(len(theta), n * m).astype(x.dtype)
    loss = -float((w * logp).sum()) / n + l2 * float((theta ** 2).sum())
    return loss, -(pull @ x.reshape(n * m, v)).astype(np.float64) / n + 2 * l2 * theta


_blas_lock = threading.Lock()
_blas_holders: list = []   # [the limiter, how many hold it]; empty when none does


@contextmanager
def one_blas_thread():
    """BLAS on one thread while any caller is inside: on these small matrices its spinning
    threads cost more than they give, and fits run side by side (parallel_map) must not each
    take every core. threadpoolctl's limit is process-wide, so it is counted: the first in
    sets it, the last out restores it (nested or overlapping plain threadpool_limits would
    restore each other's)."""
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if not _blas_holders:
            _blas_holders.extend([threadpool_limits(1, user_api="blas"), 0])
        _blas_holders[1] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_holders[1] -= 1
            if _blas_holders[1] == 0:
                _blas_holders.pop(0).restore_original_limits()
                _blas_holders.clear()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def parallel_map(fn: Callable, items: Iterable, threads: int | None = None) -> list:
    """[fn(item) for item in items], up to `threads` at a time (default: usable_cpus), with
    BLAS on one thread. The limit is set here, by the calling thread, and held for the whole
    map: a thread count set from the pool's threads was not applied (OpenBLAS 0.3.31), and on
    2 cores their BLAS threads made the start 8 times slower. The start's fits are
    independent and each seeds its own generator, so the results are those of the loop;
    NumPy's loops and scipy's L-BFGS-B release the GIL, so threads are enough (the start of
    300 users on 2 cores: 1.8 times faster side by side, bench/start_speed.py)."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    n = min(len(items), threads or usable_cpus())
    if n <= 1:
        return [fn(item) for item in items]

    with one_blas_thread(), ThreadPoolExecutor(n, thread_name_prefix="emdpo-start") as pool:
        return list(pool.map(fn, items))


def lbfgs(fun, theta0: np.ndarray, max_iter: int = 50) -> np.ndarray:
    """argmin of `fun(theta) -> (loss, gradient)` by scipy's L-BFGS-B, BLAS on one thread
    (one_blas_thread)."""
    from scipy.optimize import minimize

    def f(v: np.ndarray):
        loss, grad = fun(v.reshape(theta0.shape))
        return loss, np.asarray(grad, np.float64).ravel()

    with one_blas_thread():
        res = minimize(f, theta0.astype(np.float64).ravel(), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "ftol": 1e-6})
    return res.x.reshape(theta0.shape).astype(np.float32)


def fit_linear_mixture(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
                       gamma: np.ndarray, iterations: int, l2: float = 1e-2,
                       tol: float = 1e-3) -> LinearMixture:
    """EM for a mixture of linear Plackett-Luce models r_k = x . theta_k, from posteriors
    `gamma`; at least one M-step, so theta always fits the returned posteriors' split. Stops
    early once no posterior moves by more than `tol`."""
    mb = mask.astype(bool, copy=False)
    theta = np.zeros((gamma.shape[1], x.shape[-1]), np.float32)
    eta = gamma.mean(0)
    for it in range(max(iterations, 1)):
        w = np.asarray(gamma[user_index], np.float64)
        theta = lbfgs(lambda th: weighted_objective(x, mb, w, th, l2), theta)
        if it >= iterations:
            break
        es = e_step(record_logliks(x, mask, theta), user_index, num_users, eta)
        moved = float(np.abs(es.gamma - gamma).max())
        gamma, eta = es.gamma, es.eta
        if moved < tol:
            break
    return LinearMixture(theta, np.asarray(eta), gamma)


def mixture_loglik(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
                   mix: LinearMixture) -> float:
    """log p(all rankings) = sum_u log sum_k eta_k prod_{i of u} PL(ranking_i | theta_k)."""
    with np.errstate(divide="ignore"):
        log_eta = np.log(np.asarray(mix.eta, float))
    u = user_loglik(record_logliks(x, mask, mix.theta), user_index, num_users)
    return float(logsumexp(log_eta + u, 1).sum())


def feature_start(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
                  k: int, seed: int, refine_iterations: int, restarts: int = 1,
                  l2: float = 1e-2, gamma: np.ndarray | None = None,
                  info: dict | None = None, short: int = SHORT_RUN,
                  threads: int | None = 1) -> LinearMixture:
    """The linear Plackett-Luce mixture from `restarts` starts: k-means on preference
    embeddings (or `gamma` when given), then random hard partitions. k-means alone often
    settles on the split the features make obvious; random partitions let the likelihood
    find the others. With several starts each runs `short` iterations and the likeliest
    runs on to `refine_iterations` (short-run EM: a few iterations per start, the full
    refinement for one); the starts run side by side on `threads` (parallel_map; None: every
    usable CPU). `info` gets each start's log-likelihood."""
    if gamma is None:
        gamma = smoothed_onehot(kmeans_labels(
            preference_embeddings(x, mask, user_index, num_users), k, seed), k, 0.05)
    if restarts <= 1:
        return fit_linear_mixture(x, mask, user_index, num_users, gamma, refine_iterations, l2)
    rng = np.random.default_rng(seed)
    g0s = [gamma] + [smoothed_onehot(rng.integers(0, k, num_users), k, 0.05)
                     for _ in range(restarts - 1)]

    def short_run(g0: np.ndarray) -> tuple[float, LinearMixture]:
        mix = fit_linear_mixture(x, mask, user_index, num_users, g0,
                                 min(short, refine_iterations), l2)
        return mixture_loglik(x, mask, user_index, num_users, mix), mix

    runs = parallel_map(short_run, g0s, threads)
    lls = [ll for ll, _ in runs]
    best = int(np.argmax(lls))   # the first of equals, as in turn
    if info is not None:
        info["restart_logliks"], info["restart_chosen"] = lls, best
    if refine_iterations > short:
        return fit_linear_mixture(x, mask, user_index, num_users, runs[best][1].gamma,
                                  refine_iterations - short, l2)
    return runs[best][1]


def l2_path(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
            mix: LinearMixture, l2s: list[float], iterations: int) -> list[LinearMixture]:
    """The mixture `mix` (fitted at l2s[0]) continued down the weaker penalties l2s[1:], each
    fit started from the previous one's posteriors: [mix, fit at l2s[1], ...]: the restarts
    run once, at the strongest penalty, and the weaker ones refine their split."""
    out = [mix]
    for l2 in l2s[1:]:
        out.append(fit_linear_mixture(x, mask, user_index, num_users, out[-1].gamma,
                                      iterations, l2))
    return out


def split_merge_moves(theta: np.ndarray, gamma: np.ndarray, fit: np.ndarray,
                      min_mass: float = 1.0) -> list[tuple[int, int, int]]:
    """Candidate moves (i, j, s), likeliest first: merge type j into type i, then split type s
    (s may be i: a merged pair re-split) into s and the freed j. Merge first the pairs whose
    reward weights point the same way (cosine of theta), a type with no users before any;
    split first the types whose users the mixture fits worst (`fit` [K]: mean log-likelihood
    per ranking of each type's users under it)."""
    k = len(theta)
    norm = np.linalg.norm(theta, axis=1)
    cos = theta @ theta.T / np.maximum(np.outer(norm, norm), 1e-12)
    dead = gamma.sum(0) < min_mass
    pairs = sorted(((i, j) for i in range(k) for j in range(k) if i != j),
                   key=lambda p: (-int(dead[p[1]] and not dead[p[0]]), -cos[p], p))
    pairs = [(i, j) for i, j in pairs if dead[j] or i < j]   # a live pair once, either way
    moves = [(i, j, s) for i, j in pairs for s in range(k) if s != j and not dead[s]]
    rank = {(i, j): r for r, (i, j) in enumerate(pairs)}
    return sorted(moves, key=lambda m: (rank[m[:2]], fit[m[2]]))


def type_fit(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray,
             mix: LinearMixture) -> np.ndarray:
    """[K] mean log-likelihood per ranking of each type's users (MAP split) under that type."""
    k = mix.gamma.shape[1]
    labels = mix.gamma.argmax(1)[user_index]
    rec = record_logliks(x, mask, mix.theta)[np.arange(len(user_index)), labels]
    n = np.bincount(labels, minlength=k)
    return np.bincount(labels, weights=rec, minlength=k) / np.maximum(n, 1)


def split_type(labels: np.ndarray, emb: np.ndarray, s: int, new: int, seed: int) -> np.ndarray:
    """Hard labels with type s's users cut in two by k-means on their preference embeddings,
    one half becoming type `new`. Unchanged when s has fewer than two users."""
    out = labels.copy()
    members = np.flatnonzero(labels == s)
    if len(members) >= 2:
        out[members[kmeans_labels(emb[members], 2, seed) == 1]] = new
    return out


def merge_split(labels: np.ndarray, emb: np.ndarray, i: int, j: int, s: int,
                seed: int) -> np.ndarray | None:
    """Hard labels after the move (i, j, s) of split_merge_moves: j's users join i, then
    s's users are split in two (split_type), one half becoming j. None when s has fewer than
    two users."""
    out = np.where(labels == j, i, labels)
    return split_type(out, emb, s, j, seed) if (out == s).sum() >= 2 else None


def split_merge(x: np.ndarray, mask: np.ndarray, user_index: np.ndarray, num_users: int,
                mix: LinearMixture, l2: float, iterations: int, seed: int, tries: int,
                info: dict | None = None, min_gain: float = 1.0,
                threads: int | None = None) -> LinearMixture:
    """Split-and-merge EM (Ueda et al., 2000) on the linear mixture: restarts find one
    optimum, which may keep two types as one and split another in two (or leave a type
    with no users). Up to `tries` moves (split_merge_moves) are refitted for `iterations`
    each, `threads` at a time side by side (parallel_map; None: every usable CPU); the first
    in that order that raises the log-likelihood by more than `min_gain` nats (refits differ
    by a fraction of a nat) is kept, and the search runs again from it, at most K times.
    `info["moves"]` lists the kept ones."""
    k = mix.gamma.shape[1]
    moves: list[dict] = []
    if k < 2 or tries < 1:
        return mix
    emb = preference_embeddings(x, mask, user_index, num_users)
    ll = mixture_loglik(x, mask, user_index, num_users, mix)
    for _ in range(k):
        labels = mix.gamma.argmax(1)

        def refit(move: tuple[int, int, int]) -> tuple[LinearMixture, float] | None:
            new = merge_split(labels, emb, *move, seed)
            if new is None:
                return None
            cand = fit_linear_mixture(x, mask, user_index, num_users,
                                      smoothed_onehot(new, k, 0.05), iterations, l2)
            return cand, mixture_loglik(x, mask, user_index, num_users, cand)

        tried = split_merge_moves(mix.theta, mix.gamma, type_fit(x, mask, user_index, mix))[:tries]
        kept, n = None, max(1, min(len(tried), threads or usable_cpus()))
        for lo in range(0, len(tried), n):   # in turn (n = 1) none is refitted after the kept
            for (i, j, s), res in zip(tried[lo:lo + n], parallel_map(refit, tried[lo:lo + n], n)):
                if res is not None and res[1] > ll + min_gain:
                    kept = (res[0], {"merge": [i, j], "split": s, "loglik": [ll, res[1]]})
                    break
            if kept is not None:
                break
        if kept is None:
            break
        mix, ll = kept[0], kept[1]["loglik"][1]
        moves.append(kept[1])
    if info is not None:
        info["moves"] = moves
    return mix
