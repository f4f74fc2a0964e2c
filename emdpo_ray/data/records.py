"""Preference records: the input contract, read all-or-nothing.

    from emdpo_ray.data.records import load_records
    records = load_records("data.jsonl")        # or .parquet, or s3://bucket/data.jsonl

A record is `{"user_id", "prompt", "responses": [...], "ranking": [...]}` (ranking is a
permutation of response indices, best first) or the pairwise form
`{"user_id", "prompt", "chosen", "rejected"}`. An optional integer `true_type` is kept for
evaluation only. Any malformed record raises `RecordError` naming file, line and field;
nothing is returned from a file with one bad line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator


class RecordError(ValueError):
    """A record (or a whole file) does not follow the contract. `str()` is one line."""


@dataclass(frozen=True)
class Record:
    user_id: str
    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]  # permutation of range(len(responses)), best first
    true_type: int | None = None
    source: str = field(default="", compare=False)  # "file:line" for messages

    @property
    def ranked(self) -> list[str]:
        """Responses in ranked order, best first."""
        return [self.responses[i] for i in self.ranking]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user_id": self.user_id,
            "prompt": self.prompt,
            "responses": list(self.responses),
            "ranking": list(self.ranking),
        }
        if self.true_type is not None:
            out["true_type"] = self.true_type
        return out


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    # bool is a subclass of int in Python; a ranking of `true` is a mistake, not 1.
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(obj: Any, where: str) -> Record:
    """Validate one decoded JSON value; `where` is "file:line" for the error message."""

    def fail(fieldname: str, msg: str) -> RecordError:
        return RecordError(f"{where}: {fieldname}: {msg}" if fieldname else f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise fail("", f"expected a JSON object, got {_type_name(obj)}")

    def text(name: str) -> str:
        if name not in obj:
            raise fail(name, "missing")
        v = obj[name]
        if not isinstance(v, str):
            raise fail(name, f"expected a string, got {_type_name(v)}")
        if name == "user_id" and not v:
            raise fail(name, "must not be empty")
        return v

    user_id = text("user_id")
    prompt = text("prompt")

    has_list = "responses" in obj or "ranking" in obj
    has_pair = "chosen" in obj or "rejected" in obj
    if has_list and has_pair:
        raise fail("", "give either responses+ranking or chosen+rejected, not both")
    if has_pair:
        chosen, rejected = text("chosen"), text("rejected")
        if chosen == rejected:
            raise fail("rejected", "identical to chosen")
        responses: tuple[str, ...] = (chosen, rejected)
        ranking: tuple[int, ...] = (0, 1)
    else:
        if "responses" not in obj:
            raise fail("responses", "missing (or give chosen+rejected)")
        resp = obj["responses"]
        if not isinstance(resp, list):
            raise fail("responses", f"expected a list of strings, got {_type_name(resp)}")
        for i, r in enumerate(resp):
            if not isinstance(r, str):
                raise fail(f"responses[{i}]", f"expected a string, got {_type_name(r)}")
        if len(resp) < 2:
            raise fail("responses", f"need at least 2 responses, got {len(resp)}")
        seen: dict[str, int] = {}
        for i, r in enumerate(resp):
            if r in seen:
                raise fail(f"responses[{i}]", f"duplicate of responses[{seen[r]}]")
            seen[r] = i
        if "ranking" not in obj:
            raise fail("ranking", "missing")
        rk = obj["ranking"]
        if not isinstance(rk, list):
            raise fail("ranking", f"expected a list of integers, got {_type_name(rk)}")
        for i, v in enumerate(rk):
            if not _is_int(v):
                raise fail(f"ranking[{i}]", f"expected an integer, got {_type_name(v)}")
        for v in rk:
            if not 0 <= v < len(resp):
                raise fail("ranking", f"index {v} out of range for {len(resp)} responses")
        if len(set(rk)) != len(rk):
            raise fail("ranking", f"repeated index in {rk}: not a permutation")
        if len(rk) != len(resp):
            raise fail("ranking", f"has {len(rk)} entries for {len(resp)} responses: "
                                  "must rank every response exactly once")
        responses, ranking = tuple(resp), tuple(rk)

    true_type = obj.get("true_type")
    if true_type is not None and (not _is_int(true_type) or true_type < 0):
        raise fail("true_type", f"expected a non-negative integer, got {true_type!r}")
    return Record(user_id, prompt, responses, ranking, true_type, where)


def _iter_jsonl(path: str, data: bytes) -> Iterator[Record]:
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
        yield parse_record(obj, where)


def _iter_parquet(path: str, data: bytes) -> Iterator[Record]:
    import io

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types for a broken file
        raise RecordError(f"{path}: not a readable Parquet file: {e}") from None
    for row, obj in enumerate(table.to_pylist(), start=1):
        # Parquet has no nulls-vs-missing distinction; drop nulls so "missing" reads right.
        yield parse_record({k: v for k, v in obj.items() if v is not None}, f"{path}:row {row}")


def read_bytes(path: str) -> bytes:
    """Read a local path or any URI fsspec/pyarrow can open (s3://, gs://, file://)."""
    if "://" in path and not path.startswith("file://"):
        import pyarrow.fs as pafs

        try:
            fs, p = pafs.FileSystem.from_uri(path)
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


def load_records(path: str) -> list[Record]:
    """All records of `path`, or a `RecordError` for the first bad one (nothing partial)."""
    data = read_bytes(path)
    if path.endswith(".parquet") or data[:4] == b"PAR1":
        records = list(_iter_parquet(path, data))
    else:
        records = list(_iter_jsonl(path, data))
    if not records:
        raise RecordError(f"{path}: empty file: no records")
    return records


def group_by_user(records: list[Record]) -> tuple[list[str], list[int]]:
    """Users in first-seen order and, per record, the index of its user."""
    index: dict[str, int] = {}
    per_record = [index.setdefault(r.user_id, len(index)) for r in records]
    return list(index), per_record
