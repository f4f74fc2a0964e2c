"""Where the online user state is made durable: a journal of acknowledged updates plus
snapshots, on the run's own storage.

    j = rd.online_journal()
    users, entries = j.load()     # last snapshot's users, then the updates after it, in order
    j.append(entry)               # durable when it returns: the router may acknowledge
    j.poll()                      # updates other writers made since (shared storage only)
    j.snapshot(users)             # the state so far; the journal before it is dropped

A local run keeps an fsynced append-only file (`LocalJournal`). A run on shared storage
(s3://...) writes one object per update (`ObjectJournal`): a PUT is atomic and visible from
every node, so an actor restarted on any node recovers every acknowledged update. The cost
is one PUT per feedback (see the README's reliability table).

Two writers on one run (the old and the new cluster of a RayService upgrade, both serving
for a while): each writes its own log objects and reads the other's (`poll`), applying them
as Bayes updates, which commute, so both orders give the same posterior. Only the newest
writer (the leader: it names itself in `leader.json` when it loads) writes snapshots and
deletes what they fold in; an older writer only appends, so no acknowledged update is ever
folded away where the leader cannot see it.
"""

from __future__ import annotations

import json
import os

from emdpo_ray.utils import atomic_write_json


class LocalJournal:
    def __init__(self, folder: str, log_name: str, snapshot_name: str):
        os.makedirs(folder, exist_ok=True)
        self.log_path = os.path.join(folder, log_name)
        self.snap_path = os.path.join(folder, snapshot_name)
        self.log = None

    def load(self) -> tuple[dict, list[dict]]:
        users = {}
        if os.path.exists(self.snap_path):
            with open(self.snap_path, encoding="utf-8") as f:
                users = json.load(f)["users"]
        entries = []
        if os.path.exists(self.log_path):
            with open(self.log_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:  # a torn last line from a crash: not acked
                        continue
        self.log = open(self.log_path, "a", encoding="utf-8")
        return users, entries

    def append(self, entry: dict) -> None:
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())

    def poll(self) -> list[dict]:
        return []  # one process writes a local run's journal

    def snapshot(self, users: dict) -> bool:
        atomic_write_json(self.snap_path, {"users": users})
        self.log.close()
        self.log = open(self.log_path, "w", encoding="utf-8")
        return True


class ObjectJournal:
    """`<prefix>/log/<seq>-<writer>.json`: one update each, named so that they sort in
    order and two writers (the old and new cluster of a RayService upgrade) never overwrite
    each other. `<prefix>/<snapshot>` holds {"users", "applied": the log objects folded into
    it}; they are deleted after it is written, and skipped on load if a crash left them."""

    def __init__(self, store, prefix: str, snapshot_name: str):
        import uuid

        self.store, self.prefix = store, prefix
        self.snap = f"{prefix}/{snapshot_name}"
        self.leader = f"{prefix}/leader.json"
        self.log_dir = f"{prefix}/log"
        self.writer = uuid.uuid4().hex[:8]
        self.seq = 0
        self.applied: set[str] = set()      # log objects in memory, not yet in a snapshot
        self.folded: set[str] = set()       # log objects the last snapshot holds

    @staticmethod
    def _seq(rel: str) -> int:
        return int(os.path.basename(rel).split("-")[0].split(".")[0])

    def load(self) -> tuple[dict, list[dict]]:
        # Leader first, then read: an older writer that still saw itself as leader after
        # writing its snapshot wrote it before this read, so nothing it deletes is missed.
        self.store.put_bytes(self.leader, json.dumps({"writer": self.writer}).encode())
        raw = self.store.get_bytes(self.snap)
        snap = json.loads(raw) if raw is not None else {"users": {}, "applied": []}
        self.folded = set(snap.get("applied", []))
        return snap["users"], self.poll()

    def poll(self) -> list[dict]:
        """Log objects not yet read (another writer's, or all of them at load), in order."""
        entries = []
        for rel in sorted(self.store.list_files(self.log_dir)):
            self.seq = max(self.seq, self._seq(rel))
            if rel in self.folded or rel in self.applied:
                continue
            data = self.store.get_bytes(rel)
            if data is not None:  # None: folded into a snapshot and deleted meanwhile
                entries.append(json.loads(data))
                self.applied.add(rel)
        return entries

    def is_leader(self) -> bool:
        raw = self.store.get_bytes(self.leader)
        return raw is None or json.loads(raw).get("writer") == self.writer

    def append(self, entry: dict) -> None:
        self.seq += 1
        rel = f"{self.log_dir}/{self.seq:012d}-{self.writer}.json"
        self.store.put_bytes(rel, json.dumps(entry).encode())
        self.applied.add(rel)

    def snapshot(self, users: dict) -> bool:
        """Write `users` (which must reflect every object read so far) and delete the log
        objects it folds in; only the leader does (False: a newer writer leads, nothing done)."""
        if not self.is_leader():
            return False
        existing = set(self.store.list_files(self.log_dir))
        folded = self.applied | (self.folded & existing)
        self.store.put_bytes(self.snap, json.dumps({"users": users,
                                                    "applied": sorted(folded)}).encode())
        if not self.is_leader():  # a newer writer may have read the log before this snapshot
            return False
        for rel in folded:
            self.store.delete_file(rel)
        self.folded, self.applied = folded, set()
        return True
