"""The record contract: every malformed input is refused with file, line and field."""

import json

import pytest

from emdpo_ray.data.records import RecordError
from emdpo_ray.data.sources import load_records

GOOD = {"user_id": "u1", "prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}


def write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return str(p)


def bad(tmp_path, obj_or_line, expect):
    line = obj_or_line if isinstance(obj_or_line, (str, bytes)) else json.dumps(obj_or_line)
    path = write(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(RecordError) as e:
        load_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: "), msg
    assert expect in msg, msg
    assert "\n" not in msg


def test_good_ranking_and_pairwise(tmp_path):
    pair = {"user_id": "u2", "prompt": "q", "chosen": "yes", "rejected": "no", "true_type": 1}
    ragged = {**GOOD, "responses": ["x", "y"], "ranking": [1, 0]}
    recs = load_records(write(tmp_path, [json.dumps(GOOD), "", json.dumps(pair),
                                         json.dumps(ragged)]))
    assert [r.ranked for r in recs] == [["c", "a", "b"], ["yes", "no"], ["y", "x"]]
    assert recs[1].true_type == 1 and recs[0].true_type is None
    assert recs[2].source.endswith(":4")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "ranking": [0, 0, 1]}]), p)
    with pytest.raises(RecordError, match=r"d.parquet:row 2: ranking: repeated index"):
        load_records(str(p))
    pq.write_table(pa.Table.from_pylist([GOOD]), p)
    assert load_records(str(p))[0].ranking == (2, 0, 1)


@pytest.mark.parametrize("line,expect", [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({**GOOD, "user_id": None}, "user_id: expected a string, got null"),
    ({**GOOD, "user_id": 7}, "user_id: expected a string, got int"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, "prompt: missing"),
    ({**GOOD, "prompt": 3.5}, "prompt: expected a string, got float"),
    ({**GOOD, "responses": "abc"}, "responses: expected a list of strings, got str"),
    ({**GOOD, "responses": ["a", 1, "c"]}, "responses[1]: expected a string, got int"),
    ({**GOOD, "responses": ["a"], "ranking": [0]}, "need at least 2 responses"),
    ({**GOOD, "responses": ["a", "b", "a"]}, "responses[2]: duplicate of responses[0]"),
    ({k: v for k, v in GOOD.items() if k != "ranking"}, "ranking: missing"),
    ({**GOOD, "ranking": None}, "ranking: expected a list of integers, got null"),
    ({**GOOD, "ranking": [2, True, 1]}, "ranking[1]: expected an integer, got bool"),
    ({**GOOD, "ranking": [2, "0", 1]}, "ranking[1]: expected an integer, got str"),
    ({**GOOD, "ranking": [2, 0.0, 1]}, "ranking[1]: expected an integer, got float"),
    ({**GOOD, "ranking": [5, 0, 1]}, "ranking: index 5 out of range for 3 responses"),
    ({**GOOD, "ranking": [-1, 0, 1]}, "ranking: index -1 out of range"),
    ({**GOOD, "ranking": [1, 1, 0]}, "ranking: repeated index"),
    ({**GOOD, "ranking": [1, 0]}, "ranking: has 2 entries for 3 responses"),
    ({**GOOD, "ranking": [1, 0, 2, 3]}, "out of range"),
    ({"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "a"}, "rejected: identical"),
    ({"user_id": "u", "prompt": "p", "chosen": "a"}, "rejected: missing"),
    ({**GOOD, "chosen": "a", "rejected": "b"}, "not both"),
    ({**GOOD, "true_type": "1"}, "true_type: expected a non-negative integer"),
])
def test_malformed(tmp_path, line, expect):
    bad(tmp_path, line, expect)


def test_empty_and_missing_file(tmp_path):
    with pytest.raises(RecordError, match="empty file"):
        load_records(write(tmp_path, ["", "  "]))
    with pytest.raises(RecordError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_cli_exit_2_and_nothing_written(tmp_path):
    import subprocess
    import sys

    data = write(tmp_path, [json.dumps(GOOD), json.dumps({**GOOD, "ranking": [5, 0, 1]})])
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "emdpo_ray", "train", "--data", data, "--types",
                        "2", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().endswith(
        f"{data}:2: ranking: index 5 out of range for 3 responses"), p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()
