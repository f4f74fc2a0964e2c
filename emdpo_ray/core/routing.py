"""Which type answers a request (pure functions).

- `"model": "type-<k>"` pins type k (reason `pinned`);
- a user with a confident posterior goes to its MAP type, or to a type sampled from the
  posterior (`serve.known_users: map | sample`; reason `known_user`);
- anyone else gets a type drawn from the MMRA weights (reason `mmra`).
"""

from __future__ import annotations

import re

import numpy as np

from emdpo_ray.core.estep import entropy

PIN = re.compile(r"^type-(\d+)$")


class UnknownModel(ValueError):
    pass


def pinned_type(model: str | None, k: int) -> int | None:
    """The type a `model` field pins, None when it does not pin one."""
    if not model:
        return None
    m = PIN.match(model)
    if m is None:
        return None
    t = int(m.group(1))
    if t >= k:
        raise UnknownModel(f"model {model!r} does not exist: this run has types "
                           f"type-0 .. type-{k - 1}")
    return t


def choose_type(*, k: int, weights: np.ndarray, rng: np.random.Generator,
                pinned: int | None = None, log_posterior: np.ndarray | None = None,
                mode: str = "map", min_confidence: float = float("inf")) -> tuple[int, str]:
    if pinned is not None:
        return pinned, "pinned"
    if log_posterior is not None and entropy(log_posterior) <= min_confidence:
        if mode == "sample":
            return int(rng.choice(k, p=np.exp(log_posterior) / np.exp(log_posterior).sum())), \
                "known_user"
        return int(np.argmax(log_posterior)), "known_user"
    return int(rng.choice(k, p=weights)), "mmra"
