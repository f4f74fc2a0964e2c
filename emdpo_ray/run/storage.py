"""Folders on shared storage (s3://, gs://, ...) through pyarrow.fs, mirrored locally.

A remote folder (a run `--out s3://bucket/run`, a model) is worked on in a local mirror under
`$EMDPO_CACHE` and pushed file by file as each step completes. Readers on any node pull the
mirror. What the files are is `run/rundir.py`'s business; this module moves bytes.
"""

from __future__ import annotations

import hashlib
import os

LOCAL_CACHE_ENV = "EMDPO_CACHE"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def cache_root() -> str:
    return os.environ.get(LOCAL_CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "emdpo-ray")


class RunStore:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.remote = is_remote(uri)
        if self.remote:
            import pyarrow.fs as pafs

            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            self.scheme = self.uri.split("://", 1)[0]
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.local = os.path.join(cache_root(), "runs", digest)
        else:
            self.local = os.path.abspath(uri.removeprefix("file://"))

    def _remote_files(self) -> list[str]:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return []
        sel = pafs.FileSelector(self.root, recursive=True)
        return [i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def pull(self, skip: tuple[str, ...] = (), always: tuple[str, ...] = ()) -> str:
        """Mirror the remote folder locally: files under `skip` prefixes stay remote; a file
        of the same size is kept unless it is in `always` (files rewritten in place)."""
        if not self.remote:
            return self.local
        for path in self._remote_files():
            rel = os.path.relpath(path, self.root)
            if rel.startswith(skip):
                continue
            dst = os.path.join(self.local, rel)
            info = self.fs.get_file_info(path)
            if os.path.exists(dst) and os.path.getsize(dst) == info.size and rel not in always:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with self.fs.open_input_stream(path) as src, open(dst + ".partial", "wb") as out:
                out.write(src.read())
            os.replace(dst + ".partial", dst)
        return self.local

    def push(self, *relpaths: str) -> None:
        """Upload files or folders (relative to the run) to the remote run."""
        if not self.remote:
            return
        for rel in relpaths:
            src = os.path.join(self.local, rel)
            if os.path.isdir(src):
                for folder, _, files in os.walk(src):
                    for f in files:
                        if ".partial" not in f and not f.startswith(".tmp"):
                            self._upload(os.path.relpath(os.path.join(folder, f), self.local))
            elif os.path.exists(src):
                self._upload(rel)

    def _upload(self, rel: str) -> None:
        dst = f"{self.root}/{rel}"
        self.fs.create_dir(os.path.dirname(dst), recursive=True)
        with open(os.path.join(self.local, rel), "rb") as src, \
                self.fs.open_output_stream(dst) as out:
            out.write(src.read())

    # -- single objects on the remote store itself (no local mirror) --
    def put_bytes(self, rel: str, data: bytes) -> None:
        dst = f"{self.root}/{rel}"
        self.fs.create_dir(os.path.dirname(dst), recursive=True)
        with self.fs.open_output_stream(dst) as out:
            out.write(data)

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as src:
                return src.read()
        except FileNotFoundError:
            return None

    def list_files(self, rel_dir: str) -> list[str]:
        """Files under `rel_dir`, relative to the run."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{self.root}/{rel_dir}", allow_not_found=True, recursive=True)
        return [os.path.relpath(i.path, self.root) for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File]

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(f"{self.root}/{rel}")
        except FileNotFoundError:
            pass

    def delete(self) -> None:
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)
        if self.remote and self._remote_files():
            self.fs.delete_dir_contents(self.root)

    def checkpoint_uri(self, ckpt) -> str:
        return f"{self.scheme}://{ckpt.path}" if self.remote else ckpt.path


def checkpoint_from(uri: str):
    """A Ray Train Checkpoint for a local path or a remote URI."""
    from ray.train import Checkpoint

    if is_remote(uri):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        return Checkpoint(path, filesystem=fs)
    return Checkpoint(uri)

