"""PNG plots of a run: log-likelihood and mixing weights per iteration, type confusion."""

from __future__ import annotations

import os

import numpy as np


def plot_run(out: str, history: list[dict], gamma: np.ndarray, true_types=None) -> None:
    """em.png and confusion.png into the folder `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    if history:
        its = [h["iteration"] for h in history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        a.plot(its, [h["log_likelihood"] for h in history], marker="o")
        a.set(xlabel="EM iteration", ylabel="observed-data log-likelihood")
        eta = np.array([h["mixing_weights"] for h in history])
        for j in range(eta.shape[1]):
            b.plot(its, eta[:, j], marker="o", label=f"type {j}")
        b.set(xlabel="EM iteration", ylabel="mixing weight")
        b.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, os.path.join(out, "em.png"))
    if true_types is not None:
        k = gamma.shape[1]
        kt = int(true_types.max()) + 1
        conf = np.zeros((kt, k))
        np.add.at(conf, true_types, gamma)
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        ax.imshow(conf, cmap="Blues")
        for i in range(kt):
            for j in range(k):
                ax.text(j, i, f"{conf[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set(xlabel="learned type (posterior mass)", ylabel="true type")
        fig.tight_layout()
        _save(fig, os.path.join(out, "confusion.png"))


def plot_rewards(out: str, gen: dict) -> None:
    """rewards.png: mean true reward of each true type (rows) under each policy's
    generations (columns), the own policy outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    os.makedirs(out, exist_ok=True)
    mean, names = np.asarray(gen["reward"]), gen["policies"]
    ci = np.asarray(gen["reward_ci"])
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(names), 1.2 + 0.8 * len(mean)))
    im = ax.imshow(mean, cmap="RdYlGn", aspect="auto")
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            ax.text(j, i, f"{mean[i, j]:.2f}\n[{ci[i, j, 0]:.2f}, {ci[i, j, 1]:.2f}]",
                    ha="center", va="center", fontsize=7)
        if gen["own_policy"][i] is not None:
            j = names.index(gen["own_policy"][i])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5))
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_yticks(range(len(mean)), [f"true type {i}" for i in range(len(mean))], fontsize=8)
    ax.set_title("true reward of each policy's generations\n(held-out prompts; box: own policy)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    _save(fig, os.path.join(out, "rewards.png"))


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    tmp = path + ".partial.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
