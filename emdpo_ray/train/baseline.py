"""The no-types baseline: one DPO policy on every record with weight 1 (`baselines/single_dpo`).

MMRA reports its regret beside the mixtures, so a user sees what the types buy. It trains as
many passes as a type's policy gets in its first M-step and the final fit together, so the
comparison is of types, not of training budgets.
"""

from __future__ import annotations

import time

import numpy as np

from emdpo_ray.config import Config
from emdpo_ray.data.sources import load_records
from emdpo_ray.run.rundir import SINGLE_DPO, RunDir
from emdpo_ray.train.prepare import prepare_data


def train_single_policy(rd: RunDir, cfg: Config, say=lambda m: None) -> str:
    """Train it and install it in the run directory; returns its folder."""
    records = load_records(rd.data_path, cfg.data.user_field)
    n = len(records)
    with prepare_data(cfg, records, rd, say=say) as prep:
        res = prep.run_mstep(names=[SINGLE_DPO], num_types=1, weights=np.ones((n, 1)),
                             score_mask=np.zeros((n, 1), dtype=bool),
                             run_name=f"single-{time.time_ns()}", seed=cfg.seed * 100003 + 99991,
                             epochs=cfg.dpo.epochs + cfg.em.final_epochs)
    with res.checkpoint.as_directory() as d:
        return rd.install_baseline(d, SINGLE_DPO)
