"""Online type inference: user posteriors learned from feedback while serving.

One Ray actor holds every user's log-posterior, shared by all router replicas. Each
feedback's Plackett-Luce log-likelihoods per type update the user's posterior by Bayes' rule
(prior: the trained posterior for users seen in training, else the mixing weights eta).
Everything is kept in log space: a trained posterior of exp(-746) is 0.0 as a float, and
no feedback could ever move a user off an exact zero.

Durability: an update reaches the run's journal (run/journal.py) before the router answers
200: an fsynced local log, or for a run on shared storage (s3://) one object per update, so
that an actor that Ray restarts on another node (a node lost, a pod rescheduled) recovers
every acknowledged update. Every `serve.snapshot_every` updates the state is written as a
snapshot and the journal before it dropped. A restarted actor loads snapshot + journal.
A journal entry carries the update itself (the feedback's log-likelihoods per type), so
replaying it is the same Bayes update; updates commute, so an actor also applies what
another actor on the same run wrote (the old and new cluster of a RayService upgrade),
reading it at most every `TAIL_S` seconds (run/journal.py).

Memory is bounded: at most `serve.max_online_users` users (least recently updated evicted
first; a trained user evicted this way falls back to its trained posterior) and at most
`serve.max_feedback_history` recent feedbacks kept per user.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

import numpy as np

from emdpo_ray.core.estep import bayes_update, entropy
from emdpo_ray.run.rundir import RunDir

TAIL_S = 1.0   # how stale another writer's updates may be in this actor's answers


class UserState:
    """Plain class; `actor()` wraps it as the shared Ray actor. `trained` maps users seen
    in training to their log-posteriors."""

    def __init__(self, run_uri: str, eta: list[float], trained: dict[str, list[float]],
                 max_users: int = 100_000, max_history: int = 32, snapshot_every: int = 100,
                 journal=None):
        self.journal = journal or RunDir(run_uri).online_journal()
        with np.errstate(divide="ignore"):
            self.log_eta = np.log(np.asarray(eta, float))
        self.trained = trained
        self.max_users, self.max_history = max_users, max_history
        self.snapshot_every = snapshot_every
        self.users: OrderedDict[str, dict] = OrderedDict()
        self.since_snapshot = 0
        self.journal_ms: deque = deque(maxlen=1000)   # the durability cost per update
        self.polled = time.monotonic()
        self._load()

    # -- persistence --
    def _load(self) -> None:
        users, entries = self.journal.load()
        for u, s in users.items():
            self._put(u, s["log_posterior"], s["feedbacks"], s.get("history", []))
        for e in entries:
            self._apply(e)

    def _apply(self, e: dict) -> None:
        """Replay a journal entry: its Bayes update on the current posterior (entries written
        before they carried the update hold the posterior it produced)."""
        user = e["user"]
        old = self.users.get(user)
        if "scores" in e:
            post = bayes_update(self.prior(user), np.asarray(e["scores"], float))
            n = (old["feedbacks"] if old else 0) + 1
        else:
            post, n = e["log_posterior"], e["feedbacks"]
        self._put(user, post, n, [*(old["history"] if old else ()), e["record"]])

    def _catch_up(self, force: bool = False) -> None:
        """Apply what other writers journaled since the last look (at most every TAIL_S)."""
        if force or time.monotonic() - self.polled >= TAIL_S:
            for e in self.journal.poll():
                self._apply(e)
            self.polled = time.monotonic()

    def _put(self, user, log_post, feedbacks, history) -> None:
        self.users[user] = {"log_posterior": list(map(float, log_post)), "feedbacks": feedbacks,
                            "history": deque(history, maxlen=self.max_history)}
        self.users.move_to_end(user)
        while len(self.users) > self.max_users:
            self.users.popitem(last=False)

    def snapshot(self) -> None:
        self._catch_up(force=True)  # the snapshot folds in everything read so far
        self.journal.snapshot({u: {**s, "history": list(s["history"])}
                               for u, s in self.users.items()})
        self.since_snapshot = 0

    # -- queries --
    def prior(self, user: str) -> np.ndarray:
        if user in self.users:
            return np.asarray(self.users[user]["log_posterior"])
        if user in self.trained:
            return np.asarray(self.trained[user], float)
        return self.log_eta

    def get(self, user: str) -> dict:
        self._catch_up()
        lp = self.prior(user)
        s = self.users.get(user)
        source = "online" if s else ("trained" if user in self.trained else "prior")
        return {"user": user, "log_posterior": lp.tolist(), "posterior": np.exp(lp).tolist(),
                "entropy": float(entropy(lp)), "feedbacks": s["feedbacks"] if s else 0,
                "source": source}

    def log_posterior(self, user: str) -> list[float] | None:
        """None for users with nothing learned (neither trained nor any feedback)."""
        self._catch_up()
        if user in self.users or user in self.trained:
            return self.prior(user).tolist()
        return None

    # -- updates --
    def update(self, user: str, scores: list[float], record: dict) -> dict:
        self._catch_up()
        post = bayes_update(self.prior(user), np.asarray(scores, float))
        n = (self.users[user]["feedbacks"] if user in self.users else 0) + 1
        entry = {"user": user, "scores": np.asarray(scores, float).tolist(),
                 "log_posterior": post.tolist(), "feedbacks": n, "record": record}
        t = time.perf_counter()
        self.journal.append(entry)  # durable before the router acknowledges
        self.journal_ms.append((time.perf_counter() - t) * 1000)
        history = list(self.users[user]["history"]) if user in self.users else []
        self._put(user, post, n, history + [record])
        self.since_snapshot += 1
        if self.since_snapshot >= self.snapshot_every:
            self.snapshot()
        return self.get(user)

    def stats(self) -> dict:
        ms = sorted(self.journal_ms)
        return {"users": len(self.users),
                "max_history": max((len(s["history"]) for s in self.users.values()), default=0),
                "journal_ms_p50": ms[len(ms) // 2] if ms else None,
                "journal_ms_p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else None}


def actor_name(run_uri: str) -> str:
    import hashlib

    return "emdpo-users-" + hashlib.sha1(RunDir(run_uri).uri.encode()).hexdigest()[:12]


def actor(run_uri: str, eta, trained, *, max_users: int, max_history: int,
          snapshot_every: int, options: dict | None = None):
    """The shared state actor for this run (created once, found by name afterwards).
    `options`: Ray actor options (serve.state_actor_options), e.g. where it may run."""
    import ray

    name = actor_name(run_uri)
    # Restarts reload snapshot + journal; calls in flight at a crash fail, not re-applied.
    cls = ray.remote(num_cpus=0, max_restarts=-1)(UserState)
    return cls.options(name=name, namespace="emdpo", get_if_exists=True, lifetime="detached",
                       **(options or {})).remote(run_uri, eta, trained, max_users,
                                                 max_history, snapshot_every)
