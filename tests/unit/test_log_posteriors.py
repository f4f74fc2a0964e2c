"""A user with thousands of records: the posterior underflows as a float, the log-posterior
does not, and online Bayes updates keep moving it."""

import numpy as np

from emdpo_ray.core.estep import e_step
from emdpo_ray.run.rundir import RunDir
from emdpo_ray.serve.online import UserState


def test_many_records_keep_an_exact_log_posterior(tmp_path):
    n = 3000
    # user 0: 3000 records, each 1 nat more likely under type 0; user 1: one neutral record
    scores = np.vstack([np.tile([-1.0, -2.0], (n, 1)), [[-1.0, -1.0]]])
    ui = np.array([0] * n + [1])
    es = e_step(scores, ui, 2, np.array([0.5, 0.5]))
    # log gamma_0k = log(.5) + sum - logsumexp: type 1 is exactly -3000 nats behind
    np.testing.assert_allclose(es.log_gamma[0], [0.0, -3000.0], atol=1e-9)
    assert es.gamma[0, 1] == 0.0  # exp(-3000) underflows: the old file format lost it

    rd = RunDir(str(tmp_path))
    rd.create_or_resume({"data": "d", "types": 2, "config": {}}, overwrite=False)
    rd.write_posteriors(["heavy", "light"], es.log_gamma)
    assert rd.posteriors()["heavy"] == [1.0, 0.0]
    lp = rd.log_posteriors()
    np.testing.assert_allclose(lp["heavy"], [0.0, -3000.0], atol=1e-9)

    state = UserState(str(tmp_path), [0.5, 0.5], lp)
    # 100 feedbacks each 40 nats in favour of type 1 overturn 3000 nats of history
    for i in range(100):
        st = state.update("heavy", [-40.0, 0.0], {"i": i})
    assert np.isfinite(st["log_posterior"]).all()
    np.testing.assert_allclose(st["log_posterior"][1] - st["log_posterior"][0], 1000.0)
    assert int(np.argmax(st["posterior"])) == 1
