"""Online type inference: the user state (durability, LRU caps) and feedback over real HTTP."""

import json
import os
import time
from collections import Counter

import numpy as np

from emdpo_ray.serve.online import UserState


def test_bayes_updates_wal_replay_and_snapshot(tmp_path):
    s = UserState(str(tmp_path), [0.5, 0.5], {"old": np.log([0.9, 0.1]).tolist()}, snapshot_every=4)
    assert s.get("new")["source"] == "prior" and s.log_posterior("new") is None
    # prior eta = [.5, .5], record log-liks [-1, -3] -> posterior softmax([-1, -3]) = [.8808, .1192]
    st = s.update("new", [-1.0, -3.0], {"r": 1})
    np.testing.assert_allclose(st["posterior"], [0.8808, 0.1192], atol=1e-4)
    # a trained user starts from its trained posterior:
    # [.9, .1] * [e^-2, e^0] = [.1218, .1] -> [.5491, .4509]
    st = s.update("old", [-2.0, 0.0], {"r": 2})
    np.testing.assert_allclose(st["posterior"], [0.5491, 0.4509], atol=1e-4)
    again = UserState(str(tmp_path), [0.5, 0.5], {"old": np.log([0.9, 0.1]).tolist()}, snapshot_every=3)
    assert again.get("new") == s.get("new") and again.get("old")["feedbacks"] == 1
    s.update("old", [-1.0, 0.0], {"r": 3})  # a second entry for one user in the log
    s2 = UserState(str(tmp_path), [0.5, 0.5], {"old": np.log([0.9, 0.1]).tolist()}, snapshot_every=3)
    assert s2.get("old") == s.get("old") and list(s2.users["old"]["history"]) == [{"r": 2}, {"r": 3}]
    s.update("new", [0.0, 0.0], {"r": 4})  # fourth update: snapshot, log restarts
    assert os.path.exists(tmp_path / "online" / "snapshot.json")
    assert (tmp_path / "online" / "wal.jsonl").read_text() == ""
    third = UserState(str(tmp_path), [0.5, 0.5], {}, snapshot_every=3)
    assert third.get("new")["feedbacks"] == 2 and third.get("old")["feedbacks"] == 2


def test_memory_is_bounded(tmp_path):
    s = UserState(str(tmp_path), [0.5, 0.5], {}, max_users=3, max_history=4)
    for i in range(50):
        s.update(f"u{i % 5}", [0.0, -1.0], {"i": i})
    for i in range(20):
        s.update("flood", [0.0, -1.0], {"i": i})
    st = s.stats()
    assert st["users"] == 3 and st["max_history"] == 4
    assert list(s.users)[-1] == "flood"          # most recently updated kept
    assert "u0" not in s.users                   # least recently updated evicted


def test_two_clusters_on_one_run_lose_no_acknowledged_feedback(tmp_path, monkeypatch):
    """A RayService upgrade: the old cluster's state actor keeps acknowledging feedback after
    the new one started. Each reads the other's journal, only the new one snapshots, and a
    restarted actor sees every update: the posterior is the prior plus every feedback."""
    import pyarrow.fs as pafs

    import emdpo_ray.serve.online as online
    from emdpo_ray.run.journal import ObjectJournal
    from emdpo_ray.run.storage import RunStore

    monkeypatch.setattr(online, "TAIL_S", 0.0)

    def state():
        st = RunStore(str(tmp_path))
        st.fs, st.root, st.remote = pafs.LocalFileSystem(), str(tmp_path), True  # S3 stand-in
        return UserState(str(tmp_path), [0.5, 0.5], {}, snapshot_every=3,
                         journal=ObjectJournal(st, "online", "snapshot.json"))

    rng = np.random.default_rng(0)
    old = state()
    sent = {"u": [], "v": []}
    for _ in range(2):
        sent["u"].append(rng.normal(size=2).tolist())
        old.update("u", sent["u"][-1], {})
    new = state()                                    # the upgrade's cluster starts
    for i in range(7):                               # both acknowledge, interleaved
        for who, user in ((old, "u"), (new, "u"), (new, "v"), (old, "v")):
            if (i + len(user)) % 2 or who is new:
                sent[user].append(rng.normal(size=2).tolist())
                who.update(user, sent[user][-1], {})

    def expected(user):
        joint = np.log([0.5, 0.5]) + np.sum(sent[user], 0)
        return np.exp(joint - np.logaddexp.reduce(joint))

    # the new actor and a restarted one hold every update (the old one may miss what the new
    # one folded into a snapshot before it read it: its answers, not the journal)
    for s in (new, state()):
        for user in ("u", "v"):
            got = s.get(user)
            np.testing.assert_allclose(got["posterior"], expected(user), atol=1e-9)
            assert got["feedbacks"] == len(sent[user])
    assert os.path.exists(tmp_path / "online" / "snapshot.json")   # the new one snapshotted


def _matched_types(run, data):
    from emdpo_ray.data.sources import load_records

    post = {json.loads(x)["user_id"]: json.loads(x)["type"] for x in open(f"{run}/posteriors.jsonl")}
    votes = {}
    for r in load_records(data):
        votes.setdefault(r.true_type, Counter())[post[r.user_id]] += 1
    return {t: c.most_common(1)[0][0] for t, c in votes.items()}


def test_new_user_is_learned_from_feedback(server, synth_data):
    from emdpo_ray.data import synth

    _, client, run = server
    match = _matched_types(run, synth_data)
    meta = json.load(open(synth.meta_path(synth_data)))
    theta = np.asarray(meta["theta"])
    rng = np.random.default_rng(11)
    for t in (0, 1):
        user = f"newcomer-{t}"
        before = client.post("/v1/completions", json={"prompt": "Explain ice.", "user": user,
                                                      "max_tokens": 2})
        assert before.headers["x-emdpo-route"] == "mmra"
        for rec in synth.user_records(rng, theta, meta["reward_scale"], t, user, 12, 3):
            body = {k: v for k, v in rec.items() if k not in ("user_id", "true_type")}
            r = client.post("/v1/feedback", json={"user": user, **body})
            assert r.status_code == 200, r.text
        state = client.get(f"/v1/users/{user}").json()
        assert state["feedbacks"] == 12 and state["type"] == match[t], state
        assert state["routing"].startswith("known_user")
        served = Counter(client.post("/v1/completions", json={
            "prompt": "Explain ice.", "user": user, "max_tokens": 2}).headers["x-emdpo-type"]
            for _ in range(10))
        assert served[str(match[t])] >= 8, served


def test_pairwise_feedback_and_bad_feedback(server):
    _, client, _ = server
    r = client.post("/v1/feedback", json={"user": "pairs", "prompt": "p", "chosen": "Clearly yes.",
                                          "rejected": "Maybe no."})
    assert r.status_code == 200 and r.json()["feedbacks"] == 1
    for body, param in [({"prompt": "p", "chosen": "a", "rejected": "b"}, "user"),
                        ({"user": "x", "prompt": "p", "responses": ["a", "b"], "ranking": [0, 5]},
                         "ranking"),
                        ({"user": "x", "prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]},
                         "responses[1]"),
                        ({"user": 5, "prompt": "p", "chosen": "a", "rejected": "b"}, "user")]:
        r = client.post("/v1/feedback", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
    assert client.post("/v1/feedback", content=b"{oops",
                       headers={"content-type": "application/json"}).status_code == 400
    assert client.get("/v1/users/pairs").json()["feedbacks"] == 1


def test_posteriors_survive_state_actor_restart(server):
    import ray

    _, client, run = server
    client.post("/v1/feedback", json={"user": "durable", "prompt": "p",
                                      "responses": ["Clearly yes.", "Maybe no.", "Yeah cool."],
                                      "ranking": [2, 0, 1]})
    before = client.get("/v1/users/durable").json()
    from emdpo_ray.serve.online import actor_name

    ray.kill(ray.get_actor(actor_name(run), namespace="emdpo"), no_restart=False)
    deadline = time.time() + 60
    r = client.get("/v1/users/durable")
    while r.status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
        r = client.get("/v1/users/durable")
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["feedbacks"] == before["feedbacks"] == 1
    np.testing.assert_allclose(after["posterior"], before["posterior"])
