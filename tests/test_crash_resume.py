"""Training under faults: the driver SIGKILLed at random moments and resumed, a resident M-step
worker killed mid-M-step. Real processes, real signals, real Ray and DeepSpeed (CPU).
Figures go to the session report (runs/reliability/report.json)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import kill_a_worker_after_a_checkpoint


# both iterations run whatever the guard says: without it, or from the labels (iteration 1
# has nothing to be compared with, and iteration 2 is the last either way)
NO_GUARD = ("em.guard_holdout=0",)
FROM_LABELS = ("em.init=labels",)


def _cli_train(data, out, env_extra=None, settings=NO_GUARD):
    cmd = [sys.executable, "-m", "emdpo_ray", "train", "--data", data, "--types", "2",
           "--out", out, "--set", "em.max_iterations=2", "--set", "mmra.enabled=false",
           "--set", "em.tol_posterior=0", "--set", "dpo.min_steps=10"]
    cmd += [a for s in settings for a in ("--set", s)]
    env = {**os.environ, **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def _finish(p, timeout=900) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever the driver's local Ray left behind
        except ProcessLookupError:
            pass
    return p.returncode, err


def _kill_during(p, marker: str, delay: float) -> str:
    """SIGKILL the driver's whole process group `delay` s after `marker` on its stderr."""
    lines, seen = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line)
            if marker in line:
                seen.set()
    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(600), "".join(lines)[-3000:]
    time.sleep(delay)
    assert p.poll() is None, "finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return "".join(lines)


def _posteriors(run):
    return {r["user_id"]: r["posterior"] for r in map(json.loads, open(f"{run}/posteriors.jsonl"))}


@pytest.mark.slow
def test_driver_sigkill_after_iteration_1_resumes_to_same_posteriors(tmp_path,
                                                                     reliability_report):
    """The small version: one SIGKILL once iteration 1 is stored (iteration 2's M-step), the
    guard on: the resumed iteration 2 is tested against iteration 1's figures per user."""
    from emdpo_ray.data import synth

    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=24, types=2, rankings_per_user=6, seed=5))
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    rc, err = _finish(_cli_train(data, full, settings=FROM_LABELS))
    assert rc == 0, err[-3000:]
    p = _cli_train(data, cut, settings=FROM_LABELS)
    state = os.path.join(cut, "state.json")
    deadline = time.time() + 900
    while not os.path.exists(state) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, "finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started
    p.wait()
    assert json.load(open(state))["iteration"] == 1
    assert not os.path.exists(os.path.join(cut, "posteriors.jsonl"))
    rc, err = _finish(_cli_train(data, cut, settings=FROM_LABELS))
    assert rc == 0, err[-3000:]
    assert "resuming after iteration 1" in err
    # iteration 2's guard paired its figures with iteration 1's, restored from the run dir
    guards = [[h["guard"] for h in json.load(open(f"{r}/history.json"))[1:]] for r in (full, cut)]
    assert guards[0][0]["baseline"] is None and guards[0][1]["gain"] is not None
    assert guards[1][1]["gain"] == pytest.approx(guards[0][1]["gain"], abs=1e-6)
    assert guards[1][1]["baseline"] == pytest.approx(guards[0][1]["baseline"], abs=1e-6)
    a, b = _posteriors(full), _posteriors(cut)
    assert a.keys() == b.keys()
    diff = max(abs(x - y) for u in a for x, y in zip(a[u], b[u]))
    assert diff < 1e-3, diff
    reliability_report("driver_kill", {"kills_survived": 1,
                                       "max_posterior_diff_vs_uninterrupted": diff})


@pytest.mark.heavy
def test_driver_sigkill_in_mstep_estep_and_checkpoint_then_resume(tmp_path, reliability_report):
    """Kill `emdpo-ray train` in the M-step (random moment), in the E-step and between the
    state files; rerunning the same command resumes and ends where an uninterrupted run ends."""
    from emdpo_ray.data import synth

    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=24, types=2, rankings_per_user=6, seed=5))
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    rc, err = _finish(_cli_train(data, full))
    assert rc == 0, err[-3000:]
    state = os.path.join(cut, "state.json")
    rng = random.Random(int(time.time()))
    kills = []
    # a random moment inside an M-step: a share of how long the uninterrupted run's took
    fit_s = [h["timings"]["fit_wall_s"] for h in json.load(open(os.path.join(full, "history.json")))[1:]]

    # 1. a random moment of iteration 1's M-step (the worker group training)
    delay = rng.uniform(0.05, 0.6) * fit_s[0]
    _kill_during(_cli_train(data, cut), "iter 1: M-step", delay)
    assert not os.path.exists(state)
    kills.append(f"M-step 1 (+{delay:.1f}s)")
    # 2. inside iteration 1's E-step (scores gathered, posteriors not yet stored)
    rc, err = _finish(_cli_train(data, cut, {"EMDPO_FAULT": "estep:1"}))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert not os.path.exists(state)
    kills.append("E-step 1")
    # 3. iteration 1 completes; iteration 2 dies between history.json and state.json
    rc, err = _finish(_cli_train(data, cut, {"EMDPO_FAULT": "checkpoint:2"}))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert json.load(open(state))["iteration"] == 1
    assert [h["iteration"] for h in json.load(open(os.path.join(cut, "history.json")))] == [0, 1, 2]
    kills.append("checkpoint 2")
    # 4. a random moment of iteration 2's M-step, resumed from iteration 1's state
    p = _cli_train(data, cut)
    delay = rng.uniform(0.05, 0.6) * fit_s[1]
    _kill_during(p, "iter 2: M-step", delay)
    assert json.load(open(state))["iteration"] == 1
    kills.append(f"M-step 2 (+{delay:.1f}s)")
    # 5. iteration 2 completes; the final fit dies before its state is stored
    rc, err = _finish(_cli_train(data, cut, {"EMDPO_FAULT": "final_fit:2"}))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert "final fit: 4 epochs" in err
    st = json.load(open(state))
    assert st["iteration"] == 2 and "final_fit" not in st
    kills.append("final fit")

    rc, err = _finish(_cli_train(data, cut))
    assert rc == 0, err[-3000:]
    assert "resuming after iteration 2" in err and "final fit: done" in err
    assert json.load(open(state))["final_fit"]["after_iteration"] == 2
    assert json.load(open(os.path.join(cut, "summary.json")))["final_fit"]["epochs"] == 4
    hist = json.load(open(os.path.join(cut, "history.json")))
    assert [h["iteration"] for h in hist] == [0, 1, 2]       # none lost, none counted twice
    assert not [f for f in os.listdir(cut) if ".partial" in f or f.startswith(".tmp")]
    a, b = _posteriors(full), _posteriors(cut)
    assert a.keys() == b.keys()
    diff = max(abs(x - y) for u in a for x, y in zip(a[u], b[u]))
    assert diff < 1e-3, diff
    reliability_report("driver_kills", {"kills_survived": len(kills), "where": kills,
                                        "max_posterior_diff_vs_uninterrupted": diff,
                                        "iterations_lost_or_doubled": 0})


def _train_one_iteration(data, run, kill: bool):
    from emdpo_ray.config import load_config
    from emdpo_ray.train.driver import train

    killed, stop = [], threading.Event()
    if kill:
        threading.Thread(target=kill_a_worker_after_a_checkpoint,
                         args=(os.path.join(run, "ray_results", "mstep-001-*"), killed, stop),
                         daemon=True).start()
    cfg = load_config(None, ["em.max_iterations=1", "dpo.min_steps=60", "ray.num_workers=2",
                             "ray.checkpoint_every_steps=15", "ray.max_failures=2",
                             "mmra.enabled=false"])
    try:
        summary = train(cfg, data, 2, run)
    finally:
        stop.set()
    return summary, killed


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from emdpo_ray.data import synth

    path = str(tmp_path_factory.mktemp("wk") / "d.jsonl")
    synth.write(path, *synth.generate(users=16, types=2, rankings_per_user=4, seed=3))
    return path


@pytest.mark.slow
def test_worker_killed_mid_mstep_restarts_from_checkpoint(ray_local, small_data, tmp_path,
                                                          reliability_report):
    run = str(tmp_path / "killed")
    summary, killed = _train_one_iteration(small_data, run, kill=True)
    assert killed, "no worker was killed"
    hist = json.load(open(os.path.join(run, "history.json")))
    assert summary["iterations"] == 1 and [h["iteration"] for h in hist] == [0, 1]
    resumed = hist[1]["metrics"]["train/resumed_from_step"]
    assert resumed >= 15, hist[1]["metrics"]   # from the checkpoint, not from step 0
    reliability_report("worker_kill", {"kills_survived": len(killed),
                                       "resumed_from_step": resumed})


@pytest.mark.heavy
def test_worker_kill_result_equals_uninterrupted(ray_local, small_data, tmp_path,
                                                 reliability_report):
    """No batch skipped or repeated: the killed M-step ends where an untouched one ends."""
    _, killed = _train_one_iteration(small_data, str(tmp_path / "killed"), kill=True)
    _train_one_iteration(small_data, str(tmp_path / "clean"), kill=False)
    assert killed
    a, b = _posteriors(str(tmp_path / "clean")), _posteriors(str(tmp_path / "killed"))
    diff = max(abs(x - y) for u in a for x, y in zip(a[u], b[u]))
    assert diff < 1e-4, diff
    reliability_report("worker_kill_vs_uninterrupted", {"kills_survived": len(killed),
                                                        "max_posterior_diff": diff})


def test_resume_deletes_half_written_files_and_refuses_a_corrupt_state(tmp_path):
    """What a crash mid-write leaves (temp files, .partial folders) is never read back."""
    from emdpo_ray.config import load_config
    from emdpo_ray.run.rundir import RunDir, RunDirError
    from emdpo_ray.train.driver import run_identity, train

    run = tmp_path / "run"
    ident = run_identity(load_config(None), str(tmp_path / "d.jsonl"), 2)
    assert RunDir(str(run)).create_or_resume(ident, overwrite=False) is False
    (run / "state.json").write_text('{"iteration": 1')               # torn, by someone else
    (run / ".tmp-abc-state.json").write_text('{"iteration": 9}')
    (run / "gamma-002.npy.partial.npy").write_bytes(b"\x93NUMPY")
    (run / "policies.partial").mkdir()
    assert RunDir(str(run)).create_or_resume(ident, overwrite=False) is True
    assert sorted(os.listdir(run)) == ["run.json", "state.json"]

    from emdpo_ray.data import synth

    data = tmp_path / "d.jsonl"
    synth.write(str(data), *synth.generate(users=4, types=2, rankings_per_user=2, seed=0))
    with pytest.raises(RunDirError, match=r"state\.json: unreadable"):
        train(load_config(None), str(data), 2, str(run))


@pytest.mark.slow
def test_crash_during_sft_leaves_nothing_and_the_rerun_builds_the_same_reference(tmp_path):
    """SIGKILL between the SFT task and writing base_model/: the rerun (same command) redoes
    SFT from the same seed and gets the very same reference weights."""
    from safetensors.numpy import load_file

    from emdpo_ray.data import synth

    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=12, types=2, rankings_per_user=3, seed=4))
    extra = ["--set", "em.max_iterations=1", "--set", "dpo.min_steps=2",
             "--set", "model.tiny.sft_epochs=1"]

    def cli(out, env=None):
        cmd = [sys.executable, "-m", "emdpo_ray", "train", "--data", data, "--types", "2",
               "--out", out, "--set", "mmra.enabled=false", *extra]
        e = {**os.environ, **(env or {})}
        e.pop("RAY_ADDRESS", None)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=e)

    killed = str(tmp_path / "killed")
    rc, err = _finish(cli(killed, {"EMDPO_FAULT": "sft:0"}))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert not os.path.exists(os.path.join(killed, "base_model"))
    rc, err = _finish(cli(killed))
    assert rc == 0, err[-3000:]
    rc, err = _finish(cli(str(tmp_path / "clean")))
    assert rc == 0, err[-3000:]
    a = load_file(os.path.join(killed, "base_model", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "clean", "base_model", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert not [f for f in os.listdir(killed) if ".partial" in f]
