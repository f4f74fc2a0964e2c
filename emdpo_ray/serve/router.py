"""The `Router` deployment (FastAPI ingress): picks a type per request and answers it.

    POST /v1/completions, /v1/chat/completions (both with `stream`), /v1/feedback
    GET  /v1/models, /v1/users/{id}, /healthz

Each request: parse (api.py schemas) -> route (core/routing.py: pinned, known user, or a
draw from the MMRA weights) -> one call to the policy replicas (retried when a replica dies,
503 past `serve.request_timeout_s`) -> OpenAI-shaped body. Every error on that path is an
`HTTPError`, turned into its JSON body in one place (the app's exception handler).
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.

import asyncio
import hmac
import json
import os
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from emdpo_ray.core.routing import UnknownModel, choose_type, pinned_type
from emdpo_ray.models.decoding import GenRequest, GenResult
from emdpo_ray.serve.api import (API_KEY_ENV, AnyObject, BaseRequest, ChatRequest,
                                 CompletionRequest, FeedbackRequest, HTTPError, OpenAIApp,
                                 completion_body, json_body, sse, stream_chunk, unavailable)

app = OpenAIApp(title="emdpo-ray", docs_url=None, redoc_url=None)
OPEN_PATHS = ("/healthz",)


@app.exception_handler(HTTPError)
async def http_error(_request: Request, e: HTTPError):
    return e.response()


@app.middleware("http")
async def bearer_auth(request: Request, call_next):
    """Every route but /healthz needs the token once one is configured (the OpenAPI schema
    included); compared in constant time. The key is the serving Router replica's own."""
    key = getattr(serve.get_replica_context().servable_object, "api_key", None)
    if key and request.url.path not in OPEN_PATHS:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, f"Bearer {key}".encode()):
            return HTTPError(401, "missing or wrong bearer token",
                             kind="authentication_error").response()
    return await call_next(request)


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, run_dir: str, handles: list, type_map: list[tuple[int, int]]):
        from ray.serve import metrics

        from emdpo_ray.models.loading import context_length, load_tokenizer
        from emdpo_ray.run.rundir import RunDir
        from emdpo_ray.serve import online

        rd = RunDir.open(run_dir)
        self.cfg = cfg = rd.config()
        self.k = rd.types
        base = rd.base_path(cfg)
        self.tok = load_tokenizer(base, cfg.model)
        self.context = context_length(base, cfg.model)
        self.handles, self.type_map = handles, type_map
        w = np.clip(np.asarray(rd.mmra_weights(), float), 0, None)
        self.weights = w / w.sum()
        self.rng = np.random.default_rng()
        sv = cfg.serve
        self.state = online.actor(rd.uri, rd.mixing_weights(), rd.log_posteriors(),
                                  max_users=sv.max_online_users,
                                  max_history=sv.max_feedback_history,
                                  snapshot_every=sv.snapshot_every,
                                  options=sv.state_actor_options)
        self.api_key = sv.api_key or os.environ.get(API_KEY_ENV) or None
        self.requests = metrics.Counter(
            "emdpo_requests", description="Requests answered, per type and route reason.",
            tag_keys=("type", "reason"))
        self.started = int(time.time())

    # -- plumbing --
    async def _call(self, handle, method: str, *args) -> tuple[object, int]:
        """One policy-replica call; returns (result, attempts). A replica that dies
        mid-request is retried (Serve routes the retry to a live or restarted replica); past
        serve.request_timeout_s the caller gets 503 with Retry-After, never a hang."""
        from ray.exceptions import RayActorError

        sv = self.cfg.serve
        deadline = time.monotonic() + sv.request_timeout_s
        delay, why = 0.25, "timed out"
        for attempt in range(1, sv.retries + 2):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            resp = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(resp, timeout=left), attempt
            except asyncio.TimeoutError:
                resp.cancel()
                break
            except RayActorError as e:
                why = f"replica died ({type(e).__name__})"
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay *= 2
        raise unavailable(f"policy unavailable: {why}; retry later",
                          int(sv.policy.health_check_period_s) + 1)

    async def _state(self, method: str, *args):
        """A call to the online user-state actor; if it is down (Ray restarts it from its
        snapshot and WAL), a clear 503 instead of a 500."""
        from ray.exceptions import RayActorError

        try:
            return await asyncio.wait_for(getattr(self.state, method).remote(*args),
                                          timeout=self.cfg.serve.request_timeout_s)
        except (RayActorError, asyncio.TimeoutError) as e:
            raise unavailable(f"user state unavailable ({type(e).__name__}); retry later", 2) \
                from None

    async def _body(self, request: Request, schema):
        declared = request.headers.get("content-length")
        limit = self.cfg.serve.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "body must be a JSON object")
        try:
            return schema.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"])
            raise HTTPError(400, f"{param}: {err['msg']}", param=param) from None

    async def _route(self, req: BaseRequest) -> tuple[int, str]:
        try:
            pinned = pinned_type(req.model, self.k)
        except UnknownModel as e:
            raise HTTPError(404, str(e), param="model", kind="not_found_error") from None
        log_post = None
        if req.user and pinned is None:
            lp = await self._state("log_posterior", req.user)
            log_post = None if lp is None else np.asarray(lp)
        return choose_type(k=self.k, weights=self.weights, rng=self.rng, pinned=pinned,
                           log_posterior=log_post, mode=self.cfg.serve.known_users,
                           min_confidence=self.cfg.serve.min_confidence)

    def _gen_request(self, req: BaseRequest, prompt, k: int) -> GenRequest:
        from emdpo_ray.models.scoring import prompt_token_ids

        sv = self.cfg.serve
        max_tokens = req.max_tokens or sv.default_max_tokens
        if max_tokens > sv.max_tokens_limit:
            raise HTTPError(400, f"max_tokens: {max_tokens} is above the limit of "
                                 f"{sv.max_tokens_limit}", param="max_tokens")
        ids = prompt_token_ids(self.tok, [prompt], 10 ** 9)[0]
        if len(ids) + max_tokens > self.context:
            raise HTTPError(400, f"prompt: {len(ids)} tokens + max_tokens {max_tokens} exceed "
                                 f"the context of {self.context} tokens", param="prompt")
        _, policy = self.type_map[k]
        return GenRequest(ids, policy, max_tokens, req.temperature, req.top_p, req.seed,
                          req.stops())

    async def _answer(self, request: Request, schema, chat: bool):
        req = await self._body(request, schema)
        prompt = req.conversation() if chat else req.prompt
        k, reason = await self._route(req)
        gen = self._gen_request(req, prompt, k)
        self.requests.inc(tags={"type": str(k), "reason": reason})
        handle = self.handles[self.type_map[k][0]]
        headers = {"x-emdpo-type": str(k), "x-emdpo-route": reason}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(self._sse(handle, gen, rid, k, chat),
                                     media_type="text/event-stream", headers=headers)
        res, attempts = await self._call(handle, "generate", gen)
        if attempts > 1:
            headers["x-emdpo-attempts"] = str(attempts)
        return JSONResponse(completion_body(rid, int(time.time()), k, reason, res.text,
                                            res.finish_reason, len(gen.prompt_ids),
                                            len(res.token_ids), chat), headers=headers)

    async def _sse(self, handle, gen: GenRequest, rid: str, k: int, chat: bool):
        from ray.exceptions import RayActorError

        created = int(time.time())
        if chat:
            yield sse(stream_chunk(rid, created, k, chat, role=True))
        try:
            async for item in handle.options(stream=True).stream.remote(gen):
                if isinstance(item, GenResult):
                    yield sse(stream_chunk(rid, created, k, chat, finish=item.finish_reason))
                else:
                    yield sse(stream_chunk(rid, created, k, chat, delta=item))
        except RayActorError as e:  # headers are gone: say so in the stream, then end it
            yield sse(unavailable(f"policy replica died mid-stream ({type(e).__name__})", 1).body())
        yield sse("[DONE]")

    def _types_on(self, hi: int) -> list[int]:
        on = [(local, t) for t, (h, local) in enumerate(self.type_map) if h == hi]
        return [t for _, t in sorted(on)]

    def _user_view(self, state: dict) -> dict:
        sv = self.cfg.serve
        known = state["source"] != "prior" and state["entropy"] <= sv.min_confidence
        return {"user": state["user"], "posterior": state["posterior"],
                "type": int(np.argmax(state["posterior"])), "feedbacks": state["feedbacks"],
                "entropy": state["entropy"], "source": state["source"],
                "routing": f"known_user ({sv.known_users})" if known else "mmra"}

    # -- routes --
    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._answer(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
    async def chat_completions(self, request: Request):
        return await self._answer(request, ChatRequest, chat=True)

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [
            {"id": f"type-{j}", "object": "model", "created": self.started,
             "owned_by": "emdpo-ray", "mmra_weight": float(self.weights[j])}
            for j in range(self.k)]}

    @app.post("/v1/feedback", openapi_extra=json_body(FeedbackRequest))
    async def feedback(self, request: Request):
        """A ranking (record contract, `user` for `user_id`) that updates the user's type."""
        from emdpo_ray.data.records import RecordError, parse_record

        obj = dict((await self._body(request, AnyObject)).model_extra or {})
        if "user" in obj:
            obj.setdefault("user_id", obj.pop("user"))
        if "user_id" not in obj:
            raise HTTPError(400, "user: missing", param="user")
        try:
            rec = parse_record(obj, "feedback")
        except RecordError as e:
            msg = str(e).removeprefix("feedback: ")
            field = msg.split(":")[0] if ":" in msg else None
            raise HTTPError(400, msg, param="user" if field == "user_id" else field) from None
        record = rec.to_json()
        scores = np.zeros(self.k)
        for hi in sorted({h for h, _ in self.type_map}):
            got, _ = await self._call(self.handles[hi], "score", record)
            for local, t in enumerate(self._types_on(hi)):
                scores[t] = got[local]
        state = await self._state("update", rec.user_id, scores.tolist(), record)
        return JSONResponse(self._user_view(state))

    @app.get("/v1/users/{user_id}")
    async def user(self, user_id: str):
        return JSONResponse(self._user_view(await self._state("get", user_id)))

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "types": self.k}
