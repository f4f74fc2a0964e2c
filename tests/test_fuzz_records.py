"""The record loader under generated records and bytes: a clean RecordError or records,
never a traceback of another kind. `make test-heavy` runs the same properties with more
examples (hypothesis profile `heavy`)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emdpo_ray.data.records import Record, RecordError, parse_record
from emdpo_ray.data.sources import load_records

GOOD = {"user_id": "u1", "prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
KEYS = ["user_id", "prompt", "responses", "ranking", "chosen", "rejected", "true_type", "x"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

# Mostly-valid records with one or two fields replaced, dropped or added: the near misses
# a real file holds, which pure noise rarely reaches.
near_misses = st.fixed_dictionaries({}).flatmap(lambda _: st.builds(
    lambda base, edits, drops: {**{k: v for k, v in base.items() if k not in drops}, **edits},
    st.sampled_from([GOOD, {"user_id": "u2", "prompt": "q", "chosen": "y", "rejected": "n"}]),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=2),
    st.sets(st.sampled_from(KEYS), max_size=2)))

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.fuzz
COUNTS = {"json_values": 0, "jsonl_files": 0, "byte_strings": 0, "record_errors": 0}


@pytest.fixture(scope="module", autouse=True)
def _report(reliability_report):
    yield
    reliability_report("record_fuzz", dict(COUNTS))


def _load(tmp_path, data: bytes, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        recs = load_records(str(path))
    except RecordError as e:
        COUNTS["record_errors"] += 1
        msg = str(e)
        assert msg.startswith(str(path)), msg
        assert "\n" not in msg and "Traceback" not in msg
        return None
    assert recs and all(isinstance(r, Record) for r in recs)
    return recs


@SETTINGS
@given(obj=json_values | near_misses)
def test_any_json_value_is_a_record_or_a_record_error(obj):
    COUNTS["json_values"] += 1
    try:
        rec = parse_record(obj, "f.jsonl:7")
    except RecordError as e:
        COUNTS["record_errors"] += 1
        assert str(e).startswith("f.jsonl:7: "), str(e)
        return
    assert sorted(rec.ranking) == list(range(len(rec.responses))) and len(rec.responses) >= 2


@SETTINGS
@given(objs=st.lists(json_values | near_misses, min_size=1, max_size=5))
def test_jsonl_files_of_generated_records(tmp_path_factory, objs):
    COUNTS["jsonl_files"] += 1
    tmp = tmp_path_factory.mktemp("f")
    recs = _load(tmp, "\n".join(json.dumps(o) for o in objs).encode())
    if recs is not None:
        assert len(recs) == len(objs)  # all or nothing


@SETTINGS
@given(data=st.binary(max_size=300) | st.builds(
    lambda good, noise, cut: (good.encode()[:cut] + noise),
    st.just(json.dumps(GOOD) + "\n"), st.binary(max_size=40), st.integers(0, 80)))
def test_arbitrary_bytes(tmp_path_factory, data):
    COUNTS["byte_strings"] += 1
    tmp = tmp_path_factory.mktemp("b")
    _load(tmp, data)
    _load(tmp, b"PAR1" + data, name="data.parquet")  # the parquet path gets garbage too
