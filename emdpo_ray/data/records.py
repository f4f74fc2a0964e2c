"""Preference records: the input contract, one record at a time (`data/sources.py` reads
files, directories, globs and Hugging Face datasets all-or-nothing).

A record is a ranking or a pair, in the formats of the field (TRL's among them):

    {"user_id", "prompt": str, "responses": [str, ...], "ranking": [int, ...]}   ranking
    {"user_id", "prompt": str, "chosen": str, "rejected": str}                   TRL standard
    {"user_id", "chosen": str, "rejected": str}            implicit prompt (shared leading text)
    {"user_id", "prompt": [messages], "chosen": [assistant message], "rejected": [...]}
    {"user_id", "chosen": [messages...], "rejected": [messages...]}  implicit prompt, conversational
    {"user_id", "prompt": [messages], "responses": [[assistant message], ...], "ranking": [...]}

A message is `{"role": "system"|"user"|"assistant"|..., "content": str}`. `ranking` is a
permutation of response indices, best first. The user column is `data.user_field`
(default `user_id`). An optional integer `true_type` is kept for evaluation only. Anything
malformed raises `RecordError` naming file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")
Messages = tuple[tuple[str, str], ...]   # (role, content) pairs


class RecordError(ValueError):
    """A record (or a whole file) does not follow the contract. `str()` is one line."""


@dataclass(frozen=True, slots=True)
class Record:
    user_id: str
    prompt: str                         # plain text (a conversation: its contents, one a line)
    responses: tuple[str, ...]
    ranking: tuple[int, ...]  # permutation of range(len(responses)), best first
    true_type: int | None = None
    source: str = field(default="", compare=False)  # "file:line" for messages
    messages: Messages | None = None    # the prompt as a conversation, when it is one

    @property
    def ranked(self) -> list[str]:
        """Responses in ranked order, best first."""
        return [self.responses[i] for i in self.ranking]

    @property
    def conversational(self) -> bool:
        return self.messages is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user_id": self.user_id}
        if self.messages is None:
            out["prompt"] = self.prompt
            out["responses"] = list(self.responses)
        else:
            out["prompt"] = [{"role": r, "content": c} for r, c in self.messages]
            out["responses"] = [[{"role": "assistant", "content": y}] for y in self.responses]
        out["ranking"] = list(self.ranking)
        if self.true_type is not None:
            out["true_type"] = self.true_type
        return out


def plain_text(messages: Messages) -> str:
    """A conversation as plain text, for models without a chat template: the contents, one
    a line (serving renders chat requests the same way)."""
    return "\n".join(c for _, c in messages)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    # bool is a subclass of int in Python; a ranking of `true` is a mistake, not 1.
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(obj: Any, where: str, user_field: str = "user_id") -> Record:
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
        return v

    def messages(v: Any, name: str) -> Messages:
        if not v:
            raise fail(name, "empty conversation")
        out = []
        for i, m in enumerate(v):
            here = f"{name}[{i}]"
            if not isinstance(m, dict):
                raise fail(here, f"expected a message object, got {_type_name(m)}")
            if "role" not in m:
                raise fail(f"{here}.role", "missing")
            if m["role"] not in ROLES:
                raise fail(f"{here}.role", f"expected one of {', '.join(ROLES)}, got {m['role']!r}")
            if "content" not in m:
                raise fail(f"{here}.content", "missing")
            if not isinstance(m["content"], str):
                raise fail(f"{here}.content", f"expected text, got {_type_name(m['content'])}")
            out.append((m["role"], m["content"]))
        return tuple(out)

    def answer(v: Any, name: str, whole: bool = False) -> tuple[str, Messages]:
        """(assistant text, the turns before it); `whole`: v may hold the conversation."""
        if isinstance(v, str):
            return v, ()
        if not isinstance(v, list):
            raise fail(name, f"expected a string, got {_type_name(v)} (or a list of messages)")
        turns = messages(v, name)
        if turns[-1][0] != "assistant":
            raise fail(name, f"the last turn must be the assistant's, got {turns[-1][0]!r}")
        if len(turns) > 1 and not whole:
            raise fail(name, f"expected one assistant message, got {len(turns)} messages "
                             "(or leave out prompt and give whole conversations)")
        return turns[-1][1], turns[:-1]

    if user_field not in obj:
        hint = " (set data.user_field to the column naming the annotator)" \
            if user_field == "user_id" else ""
        raise fail(user_field, "missing" + hint)
    user_id = text(user_field)
    if not user_id:
        raise fail(user_field, "must not be empty")

    has_list = "responses" in obj or "ranking" in obj
    has_pair = "chosen" in obj or "rejected" in obj
    if has_list and has_pair:
        raise fail("", "give either responses+ranking or chosen+rejected, not both")
    conv: Messages | None = None
    if "prompt" in obj or not has_pair:
        if "prompt" not in obj:
            raise fail("prompt", "missing")
        p = obj["prompt"]
        if isinstance(p, list):
            conv = messages(p, "prompt")
            prompt = plain_text(conv)
        elif isinstance(p, str):
            prompt = p
        else:
            raise fail("prompt", f"expected a string, got {_type_name(p)} (or a list of messages)")

    if has_pair:
        for name in ("chosen", "rejected"):
            if name not in obj:
                raise fail(name, "missing")
        implicit = "prompt" not in obj
        chosen, c_before = answer(obj["chosen"], "chosen", whole=implicit)
        rejected, r_before = answer(obj["rejected"], "rejected", whole=implicit)
        if isinstance(obj["chosen"], list) != isinstance(obj["rejected"], list):
            raise fail("rejected", "chosen and rejected must both be text or both conversations")
        if implicit and isinstance(obj["chosen"], list):
            if c_before != r_before:
                raise fail("rejected", "the conversation before the last turn differs from "
                                       "chosen's: no shared prompt")
            if not c_before:
                raise fail("prompt", "missing (chosen and rejected hold only the answer)")
            conv, prompt = c_before, plain_text(c_before)
        elif implicit:
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
            if not prompt:
                raise fail("prompt", "missing (and chosen and rejected share no leading text)")
        elif isinstance(obj["chosen"], list) and conv is None:
            raise fail("prompt", "a string prompt with conversational answers: give the "
                                 "prompt as a list of messages")
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
        texts = []
        for i, r in enumerate(resp):
            if isinstance(r, list) and conv is not None:
                texts.append(answer(r, f"responses[{i}]")[0])
            elif not isinstance(r, str):
                raise fail(f"responses[{i}]", f"expected a string, got {_type_name(r)}"
                           + (" (or an assistant message list)" if conv is not None else ""))
            else:
                texts.append(r)
        if len(texts) < 2:
            raise fail("responses", f"need at least 2 responses, got {len(texts)}")
        seen: dict[str, int] = {}
        for i, r in enumerate(texts):
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
            if not 0 <= v < len(texts):
                raise fail("ranking", f"index {v} out of range for {len(texts)} responses")
        if len(set(rk)) != len(rk):
            raise fail("ranking", f"repeated index in {rk}: not a permutation")
        if len(rk) != len(texts):
            raise fail("ranking", f"has {len(rk)} entries for {len(texts)} responses: "
                                  "must rank every response exactly once")
        responses, ranking = tuple(texts), tuple(rk)

    true_type = obj.get("true_type")
    if true_type is not None and (not _is_int(true_type) or true_type < 0):
        raise fail("true_type", f"expected a non-negative integer, got {true_type!r}")
    return Record(user_id, prompt, responses, ranking, true_type, where, conv)


def _split_shared_prefix(a: str, b: str) -> tuple[str, str, str]:
    """(shared prompt, rest of a, rest of b): the longest common prefix, cut after the last
    whitespace in it so no word is split (TRL's implicit-prompt rule)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = max(a.rfind(" ", 0, n), a.rfind("\n", 0, n)) + 1 if n < min(len(a), len(b)) else n
    if cut == n and n == min(len(a), len(b)):  # one is a prefix of the other: no answer left
        cut = max(a.rfind(" ", 0, n), a.rfind("\n", 0, n)) + 1
    return a[:cut], a[cut:], b[cut:]


def group_by_user(records: list[Record]) -> tuple[list[str], list[int]]:
    """Users in first-seen order and, per record, the index of its user."""
    index: dict[str, int] = {}
    per_record = [index.setdefault(r.user_id, len(index)) for r in records]
    return list(index), per_record
