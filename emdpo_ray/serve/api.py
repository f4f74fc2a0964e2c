"""The OpenAI-compatible HTTP contract: request schemas, error bodies, response bodies.

Pure data: no Ray, no model. Errors are `{"error": {"message", "type", "param", "code"}}`
with the HTTP status as `code`, as OpenAI's API answers them.
"""

# No `from __future__ import annotations`: FastAPI and pydantic must see real types.

import json
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

API_KEY_ENV = "EMDPO_API_KEY"


# ---- requests ----

class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, description="tokens to generate")
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2 ** 64, description="per-request sampling seed")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    user: str | None = None
    stream: bool = False

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(BaseRequest):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> tuple[tuple[str, str], ...]:
        """The messages as the record contract holds a conversation: (role, content) pairs,
        rendered to tokens by data/encode.py exactly as training renders them."""
        return tuple((m.role, m.content) for m in self.messages)


class AnyObject(BaseModel):
    model_config = ConfigDict(extra="allow")


class FeedbackRequest(BaseModel):
    """Documents /v1/feedback (the body is checked by the record contract, data/records.py)."""
    model_config = ConfigDict(extra="allow")
    user: str
    prompt: str
    responses: list[str] | None = Field(None, description="3+ responses make types identifiable")
    ranking: list[int] | None = Field(None, description="response indices, best first")
    chosen: str | None = None
    rejected: str | None = None


# ---- errors ----

class HTTPError(Exception):
    """Raised anywhere on a request's path; the router turns it into the JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unavailable(message: str, retry_after_s: int) -> HTTPError:
    return HTTPError(503, message, kind="service_unavailable",
                     headers={"Retry-After": str(max(1, retry_after_s))})


# ---- responses ----

def completion_body(rid: str, created: int, k: int, route: str, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int, chat: bool) -> dict:
    body = {"id": rid, "created": created, "model": f"type-{k}", "emdpo_type": k,
            "emdpo_route": route,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    if chat:
        body.update(object="chat.completion", choices=[{
            "index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": finish, "logprobs": None}])
    else:
        body.update(object="text_completion", choices=[{
            "index": 0, "text": text, "finish_reason": finish, "logprobs": None}])
    return body


def sse(obj: dict | str) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


def stream_chunk(rid: str, created: int, k: int, chat: bool, delta: str | None = None,
                 finish: str | None = None, role: bool = False) -> dict:
    """One server-sent chunk: a text delta, the finish reason, or (chat) the role opener."""
    if chat:
        d = {"role": "assistant"} if role else ({"content": delta} if delta is not None else {})
        choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": f"type-{k}",
            "emdpo_type": k, "choices": [choice]}


# ---- OpenAPI ----

class OpenAIApp(FastAPI):
    def openapi(self) -> dict:
        """FastAPI's schema plus the request bodies, which the routes parse themselves (to
        answer OpenAI-style 400s): clients and fuzzers see the real contract."""
        if self.openapi_schema is None:
            schema = super().openapi()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatRequest, FeedbackRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
        return self.openapi_schema


def json_body(model) -> dict:
    """`openapi_extra` declaring a route's JSON body as `model`."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
