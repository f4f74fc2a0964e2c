"""Preference data as users hold it (data/records.py, data/sources.py): TRL's formats,
conversations, a user column of another name, shards, globs and saved HF datasets."""

import json

import pytest

from emdpo_ray.data.records import RecordError, parse_record
from emdpo_ray.data.sources import load_records


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def test_trl_standard_and_implicit_prompt():
    r = parse_record({"user_id": "u", "prompt": "Why?", "chosen": "Because.", "rejected": "No."},
                     "f:1")
    assert (r.prompt, r.ranked, r.messages) == ("Why?", ["Because.", "No."], None)
    r = parse_record({"user_id": "u", "chosen": "Q: why is it? Because.",
                      "rejected": "Q: why is it? No idea."}, "f:2")
    assert r.prompt == "Q: why is it? " and r.ranked == ["Because.", "No idea."]
    with pytest.raises(RecordError, match="f:3: prompt: missing .and chosen and rejected share"):
        parse_record({"user_id": "u", "chosen": "Yes.", "rejected": "No."}, "f:3")


def test_conversational_forms():
    r = parse_record({"user_id": "u", "prompt": [{"role": "system", "content": "Be brief."},
                                                 U("Why?")],
                      "chosen": [A("Because.")], "rejected": [A("No.")]}, "f:1")
    assert r.messages == (("system", "Be brief."), ("user", "Why?"))
    assert r.prompt == "Be brief.\nWhy?" and r.ranked == ["Because.", "No."]
    implicit = parse_record({"user_id": "u", "chosen": [U("Why?"), A("Because.")],
                             "rejected": [U("Why?"), A("No.")]}, "f:2")
    assert implicit.messages == (("user", "Why?"),) and implicit.ranked == ["Because.", "No."]
    ranking = parse_record({"user_id": "u", "prompt": [U("Why?")],
                            "responses": [[A("a")], [A("b")], [A("c")]], "ranking": [2, 0, 1]},
                           "f:3")
    assert ranking.ranked == ["c", "a", "b"] and ranking.conversational
    again = parse_record(ranking.to_json(), "f:4")
    assert again == ranking  # the feedback path re-reads what it stored


@pytest.mark.parametrize("obj,expect", [
    ({"prompt": [{"content": "hi"}], "chosen": [A("a")], "rejected": [A("b")]},
     "prompt[0].role: missing"),
    ({"prompt": [U("hi")], "chosen": [{"role": "assistant", "content": ["a"]}],
      "rejected": [A("b")]}, "chosen[0].content: expected text, got list"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": [A("a")], "rejected": [A("b")]},
     "prompt[0].role: expected one of"),
    ({"chosen": [U("q"), U("a")], "rejected": [U("q"), A("b")]},
     "chosen: the last turn must be the assistant's, got 'user'"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]},
     "rejected: the conversation before the last turn differs"),
    ({"prompt": [U("q")], "chosen": [U("q"), A("a")], "rejected": [A("b")]},
     "chosen: expected one assistant message, got 2"),
    ({"prompt": "q", "chosen": [A("a")], "rejected": [A("b")]},
     "prompt: a string prompt with conversational answers"),
    ({"prompt": [U("q")], "chosen": [A("a")], "rejected": "b"},
     "rejected: chosen and rejected must both be text or both conversations"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt: empty conversation"),
])
def test_malformed_conversations_name_the_field(obj, expect):
    with pytest.raises(RecordError) as e:
        parse_record({"user_id": "u", **obj}, "f.jsonl:9")
    assert str(e.value).startswith("f.jsonl:9: ") and expect in str(e.value), str(e.value)


def test_user_column(tmp_path):
    rec = {"annotator": "ann-7", "prompt": "p", "chosen": "a", "rejected": "b"}
    assert parse_record(rec, "f:1", user_field="annotator").user_id == "ann-7"
    with pytest.raises(RecordError, match=r"f:1: user_id: missing \(set data.user_field"):
        parse_record(rec, "f:1")


def _conv(i):
    return {"user_id": f"u{i % 3}", "prompt": [U(f"Question {i}?")],
            "chosen": [A(f"Yes {i}.")], "rejected": [A(f"No {i}.")]}


def test_directory_of_parquet_shards_glob_and_mixed_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "prefs"
    folder.mkdir()
    for s in range(3):
        pq.write_table(pa.Table.from_pylist([_conv(3 * s + i) for i in range(3)]),
                       folder / f"part-{s:05d}.parquet")
    (folder / "README.md").write_text("not a shard")
    recs = load_records(str(folder))
    assert [r.prompt for r in recs] == [f"Question {i}?" for i in range(9)]
    assert recs[4].source.endswith("part-00001.parquet:row 2")
    assert [r.prompt for r in load_records(str(folder / "part-0000[02].parquet"))] == \
        [f"Question {i}?" for i in (0, 1, 2, 6, 7, 8)]
    (folder / "part-00003.jsonl").write_text(json.dumps(
        {"user_id": "u", "prompt": "plain", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(RecordError, match=r"part-00003.jsonl:1: prompt: standard \(text\) record "
                                          r"in data whose first record .* is conversational"):
        load_records(str(folder))
    with pytest.raises(RecordError, match="no file matches"):
        load_records(str(folder / "nothing-*.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecordError, match="no .jsonl, .json or .parquet shard"):
        load_records(str(empty))


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([_conv(i) for i in range(4)])
    ds.save_to_disk(str(tmp_path / "hf"))
    recs = load_records(str(tmp_path / "hf"))
    assert len(recs) == 4 and recs[0].messages == (("user", "Question 0?"),)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfdict"))
    assert len(load_records(str(tmp_path / "hfdict"))) == 4
    bad = datasets.Dataset.from_list([{**_conv(0), "chosen": [U("x")]}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(RecordError, match=r"bad:row 1: chosen: the last turn must be"):
        load_records(str(tmp_path / "bad"))
