"""Mirroring a remote folder (run/storage.py), with a real pyarrow filesystem standing in
for the object store (a local folder), so no S3 server is needed here."""

import os

import pyarrow.fs as pafs
import pytest

from emdpo_ray.run.storage import RunStore, cache_root, is_remote


def test_is_remote():
    assert is_remote("s3://b/run") and is_remote("gs://b/run")
    assert not is_remote("/tmp/run") and not is_remote("file:///tmp/run")
    assert not is_remote("runs/demo")


def test_local_runs_are_their_own_mirror(tmp_path):
    store = RunStore(f"file://{tmp_path}/run")
    assert not store.remote and store.local == str(tmp_path / "run")
    assert store.pull() == store.local
    store.push("anything")  # nothing to do for a local run


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMDPO_CACHE", str(tmp_path))
    assert cache_root() == str(tmp_path)


@pytest.fixture
def remote(tmp_path):
    """A RunStore whose 'remote' is a local folder behind pyarrow's LocalFileSystem."""
    store = RunStore.__new__(RunStore)
    store.uri, store.remote, store.scheme = "s3://bucket/run", True, "s3"
    store.fs, store.root = pafs.LocalFileSystem(), str(tmp_path / "remote")
    store.local = str(tmp_path / "mirror")
    return store


def test_push_skips_half_written_files_and_pull_mirrors(remote):
    os.makedirs(os.path.join(remote.local, "policies", "type_0"))
    for rel, text in [("a.json", "1"), ("policies/type_0/w.bin", "w"),
                      ("policies/type_0/.tmp-x.bin", "torn"), ("policies/w.partial", "torn")]:
        with open(os.path.join(remote.local, rel), "w") as f:
            f.write(text)
    remote.push("a.json", "policies", "missing.json")
    pushed = sorted(os.path.relpath(os.path.join(d, f), remote.root)
                    for d, _, fs in os.walk(remote.root) for f in fs)
    assert pushed == ["a.json", os.path.join("policies", "type_0", "w.bin")]

    remote.local = remote.local + "-elsewhere"  # another node
    remote.pull(skip=("policies/",))
    assert open(os.path.join(remote.local, "a.json")).read() == "1"
    assert not os.path.exists(os.path.join(remote.local, "policies"))


def test_pull_refreshes_files_named_always_even_at_equal_size(remote):
    os.makedirs(remote.local)
    with open(os.path.join(remote.local, "state.json"), "w") as f:
        f.write("1")
    remote.push("state.json")
    with open(os.path.join(remote.root, "state.json"), "w") as f:  # rewritten remotely
        f.write("2")
    remote.pull()
    assert open(os.path.join(remote.local, "state.json")).read() == "1"  # same size: kept
    remote.pull(always=("state.json",))
    assert open(os.path.join(remote.local, "state.json")).read() == "2"


def test_checkpoint_uri_names_the_scheme(remote):
    class Ckpt:
        path = "bucket/run/ray_results/x/checkpoint_000001"

    assert remote.checkpoint_uri(Ckpt) == "s3://bucket/run/ray_results/x/checkpoint_000001"
