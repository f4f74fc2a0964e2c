"""The run directory (run/rundir.py): identity, resume, atomic layout, reading back."""

import json
import os

import numpy as np
import pytest

from emdpo_ray.config import load_config
from emdpo_ray.run.rundir import RunDir, RunDirError, type_name

IDENT = {"data": "/d.jsonl", "types": 2, "config": {"seed": 0}}


def test_new_run_then_resume_then_mismatch(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    assert rd.create_or_resume(IDENT, overwrite=False) is False  # new, nothing to resume
    assert rd.exists() and not rd.is_finished() and rd.types == 2
    assert rd.create_or_resume(IDENT, overwrite=False) is False  # no state.json yet
    rd.save_iteration(1, np.full((3, 2), 0.5), [{"iteration": 1}], {"eta": [0.5, 0.5]})
    assert rd.create_or_resume(IDENT, overwrite=False) is True
    assert rd.state()["iteration"] == 1 and rd.state()["log_gamma"] == "log-gamma-001.npy"
    np.testing.assert_array_equal(rd.load_log_gamma(rd.state()), np.full((3, 2), 0.5))
    with pytest.raises(RunDirError, match="different config or data"):
        rd.create_or_resume({**IDENT, "types": 3}, overwrite=False)
    assert rd.create_or_resume({**IDENT, "types": 3}, overwrite=True) is False
    assert rd.types == 3 and rd.state() is None


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not an emdpo-ray run directory"):
        RunDir(str(tmp_path)).create_or_resume(IDENT, overwrite=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_iteration_writes_state_last(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.create_or_resume(IDENT, overwrite=False)
    seen = []
    rd.save_iteration(2, np.zeros((1, 2)), [{"iteration": 2}], {"eta": [1.0, 0.0]},
                      before_state=lambda: seen.append(sorted(os.listdir(tmp_path))))
    assert seen == [["history.json", "log-gamma-002.npy", "run.json"]]
    assert rd.history() == [{"iteration": 2}]
    assert rd.load_heldout_per_user(rd.state()) is None  # none given, none kept


def test_the_guards_per_user_baseline_is_saved_before_state_and_reloaded(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.create_or_resume(IDENT, overwrite=False)
    seen = []
    rd.save_iteration(1, np.zeros((2, 2)), [], {"eta": [0.5, 0.5]},
                      before_state=lambda: seen.append(sorted(os.listdir(tmp_path))),
                      heldout_per_user=np.array([-0.5, -1.25]))
    assert "heldout-per-user-001.npy" in seen[0] and "state.json" not in seen[0]
    np.testing.assert_array_equal(rd.load_heldout_per_user(rd.state()), [-0.5, -1.25])
    # the final fit rewrites the state from the last one: the baseline still loads
    rd.save_iteration(1, np.zeros((2, 2)), [], {**rd.state(), "final_fit": {}})
    np.testing.assert_array_equal(rd.load_heldout_per_user(rd.state()), [-0.5, -1.25])


def test_unfinished_and_missing_runs_say_so(tmp_path):
    with pytest.raises(RunDirError, match="no run.json"):
        RunDir(str(tmp_path)).require_run()
    with pytest.raises(RunDirError, match="not a finished emdpo-ray run"):
        RunDir(str(tmp_path)).posteriors()


def test_results_round_trip(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.create_or_resume(IDENT, overwrite=False)
    rd.write_posteriors(["a", "b"], np.log([[0.9, 0.1], [0.3, 0.7]]))
    rows = [json.loads(x) for x in open(tmp_path / "posteriors.jsonl")]
    assert [r["type"] for r in rows] == [0, 1]
    assert rd.is_finished()
    np.testing.assert_allclose(rd.posteriors()["b"], [0.3, 0.7])
    np.testing.assert_allclose(np.exp(rd.log_posteriors()["a"]), [0.9, 0.1])
    assert rd.mmra_weights() == [0.5, 0.5]  # before MMRA: uniform
    rd.write_mmra({"weights": [0.2, 0.8]}, [{"policy": "type_0", "text": "x"}])
    assert rd.mmra_weights() == [0.2, 0.8] and rd.mmra_samples()[0]["text"] == "x"
    rd.write_summary({"mixing_weights": [0.6, 0.4]})
    assert rd.mixing_weights() == [0.6, 0.4]


def test_paths_of_models_and_policies(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.create_or_resume(IDENT, overwrite=False)
    cfg = load_config(None)
    assert rd.base_path(cfg) == str(tmp_path / "base_model")
    assert rd.base_path(load_config(None, ["model.name_or_path=org/m"])) == "org/m"
    assert rd.policy_dirs() == {f"type_{j}": str(tmp_path / "policies" / f"type_{j}")
                                for j in range(2)}
    ckpt = tmp_path / "ckpt" / "policies"
    for name in ("type_0", "type_1", "single_dpo"):
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / "w").write_text(name)
    rd.install_policies(str(tmp_path / "ckpt"), [type_name(0), type_name(1)])
    assert (tmp_path / "policies" / "type_1" / "w").read_text() == "type_1"
    assert "single_dpo" not in rd.policy_dirs(baselines=True)
    rd.install_baseline(str(tmp_path / "ckpt"), "single_dpo")
    assert rd.policy_dirs(baselines=True)["single_dpo"] == str(tmp_path / "baselines" / "single_dpo")
    assert rd.ray_storage(cfg) == str(tmp_path / "ray_results")


def test_leftovers_of_a_crash_are_removed_on_resume(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.create_or_resume(IDENT, overwrite=False)
    (tmp_path / ".tmp-x-state.json").write_text("{")
    (tmp_path / "policies.partial").mkdir()
    rd.create_or_resume(IDENT, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["run.json"]
