"""Where records come from: a file, a directory or glob of shards, or a Hugging Face dataset
saved with `save_to_disk`; local or on any pyarrow filesystem (s3://, gs://, ...).

    from emdpo_ray.data.sources import load_records
    load_records("data.jsonl")                 # or .parquet
    load_records("s3://bucket/prefs/")         # every *.jsonl / *.json / *.parquet shard
    load_records("prefs/part-*.parquet")       # a glob
    load_records("hf_dataset_dir/")            # datasets.load_from_disk

Shards are read one at a time (Parquet in record batches), in sorted name order. All or
nothing: the first malformed record raises `RecordError` naming its shard, line (or row) and
field, and nothing is returned. Conversational and standard records are not mixed.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
from typing import Iterator

from emdpo_ray.data.records import Record, RecordError, parse_record

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet")


def _remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs(path: str):
    """(pyarrow filesystem, path on it)."""
    import pyarrow.fs as pafs

    if _remote(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (OSError, ValueError) as e:
            raise RecordError(f"{path}: cannot open: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))


def read_bytes(path: str) -> bytes:
    """Read a local path or any URI pyarrow can open (s3://, gs://, file://)."""
    if _remote(path):
        fs, p = _fs(path)
        try:
            with fs.open_input_stream(p) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise RecordError(f"{path}: cannot read: {e}") from None
    local = path.removeprefix("file://")
    try:
        with open(local, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RecordError(f"{path}: is a directory, expected a .jsonl or .parquet file") from None


def _shards(path: str) -> tuple[str, list[str]]:
    """('file' | 'shards' | 'hf', the shard paths, each named as the user would name it)."""
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    prefix = path.split("://", 1)[0] + "://" if _remote(path) else ""
    if any(ch in p for ch in "*?["):
        folder, pattern = os.path.split(p)
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and fnmatch.fnmatch(os.path.basename(i.path), pattern))
        if not found:
            raise RecordError(f"{path}: no file matches")
        return "shards", [prefix + f for f in found]
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise RecordError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        return "file", [path]
    names = {os.path.basename(i.path): i for i in fs.get_file_info(pafs.FileSelector(p))}
    if "dataset_info.json" in names or "dataset_dict.json" in names:  # save_to_disk
        return "hf", [path]
    found = sorted(i.path for n, i in names.items()
                   if i.type == pafs.FileType.File and n.endswith(SHARD_SUFFIXES))
    if not found:
        raise RecordError(f"{path}: a directory with no .jsonl, .json or .parquet shard")
    return "shards", [prefix + f for f in found]


def _iter_jsonl(path: str, data: bytes, user_field: str) -> Iterator[Record]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        yield parse_record(obj, where, user_field)


def _rows(rows, path: str, user_field: str, start: int = 1) -> Iterator[Record]:
    for row, obj in enumerate(rows, start=start):
        # Parquet and Arrow have no nulls-vs-missing distinction; drop nulls so "missing"
        # reads right.
        yield parse_record({k: v for k, v in obj.items() if v is not None}, f"{path}:row {row}",
                           user_field)


def _iter_parquet(path: str, data: bytes, user_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=4096)
        row = 1
        for batch in batches:
            rows = batch.to_pylist()
            yield from _rows(rows, path, user_field, row)
            row += len(rows)
    except RecordError:
        raise
    except Exception as e:  # pyarrow raises several types for a broken file
        raise RecordError(f"{path}: not a readable Parquet file: {e}") from None


def _iter_hf(path: str, user_field: str) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise RecordError(f"{path}: a Hugging Face dataset; install `datasets` to read "
                          "it") from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several types for a broken folder
        raise RecordError(f"{path}: not a readable Hugging Face dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise RecordError(f"{path}: a DatasetDict without a 'train' split "
                              f"(splits: {', '.join(ds)})")
        ds, path = ds["train"], f"{path}[train]"
    yield from _rows(iter(ds), path, user_field)


def iter_records(path: str, user_field: str = "user_id") -> Iterator[Record]:
    """Records of every shard of `path` in order; raises on the first bad one."""
    kind, shards = _shards(path)
    if kind == "hf":
        yield from _iter_hf(shards[0], user_field)
        return
    for shard in shards:
        data = read_bytes(shard)
        if shard.endswith(".parquet") or data[:4] == b"PAR1":
            yield from _iter_parquet(shard, data, user_field)
        else:
            yield from _iter_jsonl(shard, data, user_field)


def load_records(path: str, user_field: str = "user_id") -> list[Record]:
    """All records of `path`, or a `RecordError` for the first bad one (nothing partial)."""
    records: list[Record] = []
    for r in iter_records(path, user_field):
        if records and r.conversational != records[0].conversational:
            kinds = {True: "conversational", False: "standard (text)"}
            raise RecordError(f"{r.source}: prompt: {kinds[r.conversational]} record in data "
                              f"whose first record ({records[0].source}) is "
                              f"{kinds[records[0].conversational]}; use one format")
        records.append(r)
    if not records:
        raise RecordError(f"{path}: empty file: no records")
    return records
