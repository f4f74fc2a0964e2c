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


def test_object_journal_never_drops_another_writers_updates(tmp_path):
    """Two writers (old and new cluster during an upgrade): a snapshot deletes only what it
    folded in, and a crash between the snapshot and its deletes re-applies nothing."""
    a = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    a.load()
    a.append({"n": "a1"})
    b = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    b.load()                                                         # b holds a1
    b.append({"n": "b1"})
    a.append({"n": "a2"})
    a.snapshot({"from": "a"})                                        # folds a1, a2; not b1
    assert [n[13:] for n in os.listdir(tmp_path / "online" / "log")] == [f"{b.writer}.json"]
    users, entries = ObjectJournal(_store(tmp_path), "online", "snapshot.json").load()
    assert users == {"from": "a"} and [e["n"] for e in entries] == ["b1"]

    c = ObjectJournal(_store(tmp_path), "online", "snapshot.json")
    c.load()
    c.store.delete_file = lambda rel: None                           # crash before the deletes
    c.snapshot({"from": "c"})
    users, entries = ObjectJournal(_store(tmp_path), "online", "snapshot.json").load()
    assert users == {"from": "c"} and entries == []


def test_local_journal_skips_a_torn_last_line(tmp_path):
    j = LocalJournal(str(tmp_path), "wal.jsonl", "snapshot.json")
    j.load()
    j.append({"n": 1})
    with open(tmp_path / "wal.jsonl", "a") as f:
        f.write('{"n": 2')                                           # a crash mid-write
    assert LocalJournal(str(tmp_path), "wal.jsonl", "snapshot.json").load() == ({}, [{"n": 1}])
