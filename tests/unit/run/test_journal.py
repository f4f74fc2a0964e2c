"""The online journal on a real pyarrow filesystem (the local one standing in for S3)."""

import os

import pyarrow.fs as pafs

from emdpo_ray.run.journal import LocalJournal, ObjectJournal
from emdpo_ray.run.storage import RunStore


def _store(root):
    st = RunStore(str(root))
    st.fs, st.root, st.remote = pafs.LocalFileSystem(), str(root), True
    return st


def test_object_journal_replays_after_its_snapshot_and_never_reuses_a_key(tmp_path):
    j = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    assert j.load() == ({}, [])
    for i in range(3):
        j.append({"user": "a", "n": i})
    again = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    users, entries = again.load()
    assert users == {} and [e["n"] for e in entries] == [0, 1, 2]
    again.snapshot({"a": {"n": 2}})
    assert os.listdir(tmp_path / "online" / "log") == []          # folded into the snapshot
    again.append({"user": "b", "n": 3})
    third = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    users, entries = third.load()
    assert users == {"a": {"n": 2}} and [e["n"] for e in entries] == [3]
    third.append({"user": "b", "n": 4})                              # after seq 4, not over it
    assert [n[:12] for n in sorted(os.listdir(tmp_path / "online" / "log"))] == [
        "000000000004", "000000000005"]
    assert [e["n"] for e in ObjectJournal(_store(tmp_path), "online",
                                          "snapshot.json").load()[1]] == [3, 4]


def _log(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "online" / "log"))


def test_two_writers_read_each_other_and_only_the_newest_snapshots(tmp_path):
    """The old and new cluster of an upgrade: each reads the other's updates, only the
    newest (the leader) folds them into a snapshot, and nothing acknowledged is dropped."""
    a = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    a.load()
    a.append({"n": "a1"})
    b = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    assert [e["n"] for e in b.load()[1]] == ["a1"]                   # b leads from here
    b.append({"n": "b1"})
    a.append({"n": "a2"})
    assert not a.snapshot({"from": "a"})                             # a no longer leads:
    assert not (tmp_path / "online" / "snapshot.json").exists() and len(_log(tmp_path)) == 3
    assert [e["n"] for e in a.poll()] == ["b1"] and a.poll() == []   # each reads the other
    assert [e["n"] for e in b.poll()] == ["a2"]
    assert b.snapshot({"from": "b"}) and _log(tmp_path) == []        # a1, b1, a2 folded
    a.append({"n": "a3"})                                            # the old one still acks
    users, entries = ObjectJournal(_store(tmp_path), "online", "snapshot.json").load()
    assert users == {"from": "b"} and [e["n"] for e in entries] == ["a3"]

    c = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    c.load()
    c.store.delete_file = lambda rel: None                           # crash before the deletes
    c.snapshot({"from": "c"})
    users, entries = ObjectJournal(_store(tmp_path), "online", "snapshot.json").load()
    assert users == {"from": "c"} and entries == []


def test_a_leader_replaced_during_its_snapshot_deletes_nothing(tmp_path):
    a = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    a.load()
    a.append({"n": "a1"})
    put = a.store.put_bytes
    newer = []

    def put_then_lose_the_lead(rel, data):                           # b starts right after
        put(rel, data)
        if rel.endswith("snapshot.json"):
            newer.append(ObjectJournal(_store(tmp_path), "online", "snapshot.json"))
            newer[0].load()

    a.store.put_bytes = put_then_lose_the_lead
    assert not a.snapshot({"from": "a"})
    assert len(_log(tmp_path)) == 1                                  # b may not have read it


def test_local_journal_skips_a_torn_last_line(tmp_path):
    j = LocalJournal(str(tmp_path), "wal.jsonl", "snapshot.json")
    j.load()
    j.append({"n": 1})
    with open(tmp_path / "wal.jsonl", "a") as f:
        f.write('{"n": 2')                                           # a crash mid-write
    assert LocalJournal(str(tmp_path), "wal.jsonl", "snapshot.json").load() == ({}, [{"n": 1}])
