"""Ray Serve: the K policies behind an MMRA router, OpenAI-compatible HTTP.

    emdpo-ray serve --run runs/demo/run --port 8000
    emdpo-ray serve --run s3://bucket/run --print-config   # for `serve deploy` / RayService

LoRA runs get one `PolicyServer` holding the base and all K adapters, which decodes
concurrent requests for any mix of types in one batched forward (`@serve.batch`, PEFT
`adapter_names` per row). Full fine-tuned runs get one `PolicyServer` per type. The
`Router` (FastAPI ingress) picks the type per request (routing.py) and answers
`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/healthz`.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve

from emdpo_ray.config import Config, load_config
from emdpo_ray.decoding import GenRequest, GenResult, generate_batch, peft_forward, plain_forward
from emdpo_ray.routing import UnknownModel, choose_type, pinned_type

API_KEY_ENV = "EMDPO_API_KEY"


# ---- request schemas (OpenAI-compatible subset) ----

class _Req(BaseModel):
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


class CompletionRequest(_Req):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)


class _AnyObject(BaseModel):
    model_config = ConfigDict(extra="allow")


class FeedbackRequest(BaseModel):
    """Documents /v1/feedback (the body is checked by the record contract, records.py)."""
    model_config = ConfigDict(extra="allow")
    user: str
    prompt: str
    responses: list[str] | None = Field(None, description="3+ responses make types identifiable")
    ranking: list[int] | None = Field(None, description="response indices, best first")
    chosen: str | None = None
    rejected: str | None = None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.status}},
                            status_code=self.status, headers=self.headers)


def unavailable(message: str, retry_after_s: int) -> HTTPError:
    return HTTPError(503, message, kind="service_unavailable",
                     headers={"Retry-After": str(max(1, retry_after_s))})


# ---- run directory ----

def run_layout(run_uri: str) -> dict:
    """What serving needs from a run: config, K, base path, policy folders, routing state.
    A remote run (s3://...) is pulled to this node's cache first."""
    from emdpo_ray.mmra_run import base_path_of
    from emdpo_ray.storage import open_run
    from emdpo_ray.utils import read_json

    _, run_dir = open_run(run_uri)

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    ident = read_json(os.path.join(run_dir, "run.json"))
    k = ident["types"]
    mm_path = os.path.join(run_dir, "mmra.json")
    weights = read_json(mm_path)["weights"] if os.path.exists(mm_path) else [1.0 / k] * k
    posteriors = {}
    for line in open(os.path.join(run_dir, "posteriors.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        posteriors[row["user_id"]] = row["posterior"]
    return {"cfg": cfg, "k": k, "base_path": base_path_of(run_dir, cfg), "local": run_dir,
            "policy_dirs": {f"type_{j}": os.path.join(run_dir, "policies", f"type_{j}")
                            for j in range(k)},
            "weights": weights, "posteriors": posteriors}


# ---- deployments ----

@serve.deployment(name="PolicyServer")
class PolicyServer:
    """Base + policies `names`; batches concurrent requests across them."""

    def __init__(self, run_dir: str, names: list[str], max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.005):
        import torch

        from emdpo_ray.models import PolicyBank, load_base, load_tokenizer

        lay = run_layout(run_dir)
        cfg: Config = lay["cfg"]
        self.cfg = cfg
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.tok = load_tokenizer(lay["base_path"], cfg.model)
        dirs = {n: lay["policy_dirs"][n] for n in names}
        self.bank = PolicyBank(load_base(lay["base_path"], cfg.model), cfg.model, names,
                               init_from=dirs).eval()
        forward = (peft_forward(self.bank.model, names) if cfg.model.finetune == "lora"
                   else plain_forward(self.bank.policies[0]))
        # PEFT applies per-row adapter_names through hooks on the shared model, so two
        # forwards at once (a stream beside a batch) would mix their adapters: one at a time.
        self.lock = threading.Lock()

        def locked_forward(*args):
            with self.lock:
                return forward(*args)

        self.forward = locked_forward
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches: list[int] = []

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        self.batches.append(len(reqs))
        return await asyncio.to_thread(generate_batch, self.forward, self.tok, reqs)

    async def generate_one(self, req: GenRequest) -> GenResult:
        """Unbatched path (used to measure what batching buys)."""
        return (await asyncio.to_thread(generate_batch, self.forward, self.tok, [req]))[0]

    async def stream(self, req: GenRequest):
        """Yield text deltas as they are decoded."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(_row, delta):
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        def run():
            try:
                res = generate_batch(self.forward, self.tok, [req], on_token=on_token)[0]
                loop.call_soon_threadsafe(queue.put_nowait, res)
            except Exception as e:  # surface to the caller instead of hanging the stream
                loop.call_soon_threadsafe(queue.put_nowait, e)

        task = loop.run_in_executor(None, run)
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, GenResult):
                break
        await task

    def score(self, record: dict) -> list[float]:
        """Plackett-Luce log-likelihood of a feedback ranking under each policy here."""
        import torch

        from emdpo_ray.data import encode
        from emdpo_ray.losses import plackett_luce_logp
        from emdpo_ray.mstep import pair_logps
        from emdpo_ray.records import parse_record

        enc = encode([parse_record(record, "feedback")], self.tok, self.cfg.data)
        n = len(self.bank.names)
        pairs = np.array([(0, j) for j in range(n)] + [(0, -1)])
        with torch.no_grad(), self.lock:
            lp, _, mask = pair_logps(self.bank.logps, enc.arrays(), pairs, torch.device("cpu"))
        rewards = self.cfg.dpo.beta * (lp[:n] - lp[n:])
        return plackett_luce_logp(rewards, mask[:n]).double().tolist()

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    def check_health(self):
        if self.bank is None:
            raise RuntimeError("policies not loaded")


class _App(FastAPI):
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


def _json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


app = _App(title="emdpo-ray", docs_url=None, redoc_url=None)
_api_key: str | None = None  # set by the Router replica in this process
OPEN_PATHS = ("/healthz",)


@app.middleware("http")
async def bearer_auth(request: Request, call_next):
    """Every route but /healthz needs the token once one is configured (the OpenAPI
    schema included); compared in constant time."""
    if _api_key and request.url.path not in OPEN_PATHS:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, f"Bearer {_api_key}".encode()):
            return HTTPError(401, "missing or wrong bearer token",
                             kind="authentication_error").response()
    return await call_next(request)


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, run_dir: str, handles: list, type_map: list[tuple[int, int]]):
        from ray.serve import metrics

        from emdpo_ray.models import load_tokenizer

        lay = run_layout(run_dir)
        self.cfg: Config = lay["cfg"]
        self.k = lay["k"]
        self.tok = load_tokenizer(lay["base_path"], self.cfg.model)
        from transformers import AutoConfig

        from emdpo_ray.models import _local

        mc = AutoConfig.from_pretrained(_local(lay["base_path"]),
                                        trust_remote_code=self.cfg.model.trust_remote_code)
        self.context = int(getattr(mc, "max_position_embeddings", 2048))
        self.handles, self.type_map = handles, type_map
        w = np.clip(np.asarray(lay["weights"], float), 0, None)
        self.weights = w / w.sum()
        self.rng = np.random.default_rng()
        from emdpo_ray import online
        from emdpo_ray.utils import read_json

        sv = self.cfg.serve
        eta = read_json(os.path.join(lay["local"], "summary.json"))["mixing_weights"]
        self.state = online.actor(lay["local"], eta, lay["posteriors"], max_users=sv.max_online_users,
                                  max_history=sv.max_feedback_history,
                                  snapshot_every=sv.snapshot_every)
        # Set on the imported module: Serve may ship this class by value, with its own globals.
        import emdpo_ray.serving as this_module

        this_module._api_key = self.cfg.serve.api_key or os.environ.get(API_KEY_ENV) or None
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
                          int(self.cfg.serve.policy.health_check_period_s) + 1)

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

    async def _route(self, req: _Req) -> tuple[int, str]:
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

    def _gen_request(self, req: _Req, prompt: str, k: int) -> GenRequest:
        from emdpo_ray.models import prompt_token_ids

        max_tokens = req.max_tokens or self.cfg.serve.default_max_tokens
        if max_tokens > self.cfg.serve.max_tokens_limit:
            raise HTTPError(400, f"max_tokens: {max_tokens} is above the limit of "
                                 f"{self.cfg.serve.max_tokens_limit}", param="max_tokens")
        ids = prompt_token_ids(self.tok, [prompt], 10 ** 9)[0]
        if len(ids) + max_tokens > self.context:
            raise HTTPError(400, f"prompt: {len(ids)} tokens + max_tokens {max_tokens} exceed "
                                 f"the context of {self.context} tokens", param="prompt")
        _, policy = self.type_map[k]
        return GenRequest(ids, policy, max_tokens, req.temperature, req.top_p, req.seed,
                          req.stops())

    async def _answer(self, request: Request, schema, chat: bool):
        try:
            req = await self._body(request, schema)
            if chat:
                prompt = self._chat_prompt(req.messages)
            else:
                prompt = req.prompt
            k, reason = await self._route(req)
            gen = self._gen_request(req, prompt, k)
        except HTTPError as e:
            return e.response()
        self.requests.inc(tags={"type": str(k), "reason": reason})
        handle = self.handles[self.type_map[k][0]]
        headers = {"x-emdpo-type": str(k), "x-emdpo-route": reason}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(self._sse(handle, gen, rid, k, chat),
                                     media_type="text/event-stream", headers=headers)
        try:
            res, attempts = await self._call(handle, "generate", gen)
        except HTTPError as e:
            return e.response()
        if attempts > 1:
            headers["x-emdpo-attempts"] = str(attempts)
        usage = {"prompt_tokens": len(gen.prompt_ids), "completion_tokens": len(res.token_ids),
                 "total_tokens": len(gen.prompt_ids) + len(res.token_ids)}
        body = {"id": rid, "created": int(time.time()), "model": f"type-{k}",
                "emdpo_type": k, "emdpo_route": reason, "usage": usage}
        if chat:
            body.update(object="chat.completion", choices=[{
                "index": 0, "message": {"role": "assistant", "content": res.text},
                "finish_reason": res.finish_reason, "logprobs": None}])
        else:
            body.update(object="text_completion", choices=[{
                "index": 0, "text": res.text, "finish_reason": res.finish_reason,
                "logprobs": None}])
        return JSONResponse(body, headers=headers)

    async def _sse(self, handle, gen: GenRequest, rid: str, k: int, chat: bool):
        created = int(time.time())

        def chunk(delta: str | None, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": {"content": delta} if delta is not None else {},
                          "finish_reason": finish, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish,
                          "logprobs": None}
                obj = "text_completion"
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                          "model": f"type-{k}", "emdpo_type": k,
                                          "choices": [choice]}) + "\n\n"

        if chat:
            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk",
                                         "created": created, "model": f"type-{k}",
                                         "emdpo_type": k, "choices": [{
                                             "index": 0, "delta": {"role": "assistant"},
                                             "finish_reason": None}]}) + "\n\n"
        from ray.exceptions import RayActorError

        try:
            async for item in handle.options(stream=True).stream.remote(gen):
                if isinstance(item, GenResult):
                    yield chunk(None, item.finish_reason)
                else:
                    yield chunk(item, None)
        except RayActorError as e:  # headers are gone: say so in the stream, then end it
            err = unavailable(f"policy replica died mid-stream ({type(e).__name__})", 1)
            yield "data: " + json.dumps(json.loads(err.response().body)) + "\n\n"
        yield "data: [DONE]\n\n"

    def _chat_prompt(self, messages: list[ChatMessage]) -> str:
        msgs = [m.model_dump() for m in messages]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # No template (the tiny default model): the conversation as plain lines.
        return "\n".join(m["content"] for m in msgs)

    # -- routes --
    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._answer(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatRequest))
    async def chat_completions(self, request: Request):
        return await self._answer(request, ChatRequest, chat=True)

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [
            {"id": f"type-{j}", "object": "model", "created": self.started,
             "owned_by": "emdpo-ray", "mmra_weight": float(self.weights[j])}
            for j in range(self.k)]}

    @app.post("/v1/feedback", openapi_extra=_json_body(FeedbackRequest))
    async def feedback(self, request: Request):
        """A ranking (record contract, `user` for `user_id`) that updates the user's type."""
        from emdpo_ray.records import RecordError, parse_record

        try:
            obj = await self._body(request, _AnyObject)
            obj = dict(obj.model_extra or {})
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
        except HTTPError as e:
            return e.response()
        record = rec.to_json()
        scores = np.zeros(self.k)
        for hi in sorted({h for h, _ in self.type_map}):
            try:
                got, _ = await self._call(self.handles[hi], "score", record)
            except HTTPError as e:
                return e.response()
            for local, t in enumerate(self._types_on(hi)):
                scores[t] = got[local]
        try:
            state = await self._state("update", rec.user_id, scores.tolist(), record)
        except HTTPError as e:
            return e.response()
        return JSONResponse(self._user_view(state))

    @app.get("/v1/users/{user_id}")
    async def user(self, user_id: str):
        try:
            return JSONResponse(self._user_view(await self._state("get", user_id)))
        except HTTPError as e:
            return e.response()

    def _types_on(self, hi: int) -> list[int]:
        on = [(local, t) for t, (h, local) in enumerate(self.type_map) if h == hi]
        return [t for _, t in sorted(on)]

    def _user_view(self, state: dict) -> dict:
        known = state["source"] != "prior" and state["entropy"] <= self.cfg.serve.min_confidence
        return {"user": state["user"], "posterior": state["posterior"],
                "type": int(np.argmax(state["posterior"])), "feedbacks": state["feedbacks"],
                "entropy": state["entropy"], "source": state["source"],
                "routing": (f"known_user ({self.cfg.serve.known_users})" if known else "mmra")}

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "types": self.k}


# ---- application ----

def _options(d) -> dict:
    opts = {"ray_actor_options": d.ray_actor_options,
            "max_ongoing_requests": d.max_ongoing_requests,
            "health_check_period_s": d.health_check_period_s}
    if d.num_replicas:
        opts["num_replicas"] = d.num_replicas
    else:
        opts["autoscaling_config"] = d.autoscaling_config
    return opts


def app_builder(args: dict):
    """Serve application builder: `import_path: emdpo_ray.serving:app_builder`,
    `args: {run_dir: ...}`."""
    if "run_dir" not in args:
        raise ValueError("app_builder needs args.run_dir (a run directory)")
    from emdpo_ray.storage import is_remote

    run_dir = args["run_dir"] if is_remote(args["run_dir"]) else os.path.abspath(args["run_dir"])
    lay = run_layout(run_dir)
    cfg: Config = lay["cfg"]
    k = lay["k"]
    names = [f"type_{j}" for j in range(k)]
    sv = cfg.serve
    popts = _options(sv.policy)
    if cfg.model.finetune == "lora":
        handles = [PolicyServer.options(**popts).bind(run_dir, names, sv.max_batch_size,
                                                      sv.batch_wait_timeout_s)]
        type_map = [(0, j) for j in range(k)]
    else:
        handles = [PolicyServer.options(name=f"PolicyServer_{n}", **popts).bind(
            run_dir, [n], sv.max_batch_size, sv.batch_wait_timeout_s) for n in names]
        type_map = [(j, 0) for j in range(k)]
    return Router.options(**_options(sv.router)).bind(run_dir, handles, type_map)


def serve_config(run_dir: str, host: str = "0.0.0.0", port: int = 8000) -> dict:
    """A Serve config (serve deploy / RayService serveConfigV2) for this run."""
    lay = run_layout(run_dir)
    sv = lay["cfg"].serve
    deployments = [{"name": "Router", **_options(sv.router)}]
    if lay["cfg"].model.finetune == "lora":
        deployments.append({"name": "PolicyServer", **_options(sv.policy)})
    else:
        deployments += [{"name": f"PolicyServer_type_{j}", **_options(sv.policy)}
                        for j in range(lay["k"])]
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": "emdpo", "route_prefix": "/",
                              "import_path": "emdpo_ray.serving:app_builder",
                              "args": {"run_dir": run_dir}, "deployments": deployments}]}


def start(run_dir: str, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False):
    """Deploy on the current (or a new local) Ray; returns the base URL."""
    from emdpo_ray.em import ensure_ray
    from emdpo_ray.storage import is_remote, open_run

    if not is_remote(run_dir):
        run_dir = os.path.abspath(run_dir)
    ensure_ray(load_config(os.path.join(open_run(run_dir)[1], "config.yaml")), verbose)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app_builder({"run_dir": run_dir}), name="emdpo", route_prefix="/")
    return f"http://{host}:{port}"


def serve_main(a) -> int:
    import signal

    import yaml

    from emdpo_ray.storage import is_remote, open_run

    if not a.print_config:
        # Block SIGINT/SIGTERM before any thread starts (threads inherit the mask) and wait
        # for them below, so Ray's fatal-signal handler never sees them: a clean shutdown.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    run_dir = a.run if is_remote(a.run) else os.path.abspath(a.run)
    if not os.path.exists(os.path.join(open_run(run_dir)[1], "posteriors.jsonl")):
        from emdpo_ray.mmra import MatrixError

        raise MatrixError(f"{a.run}: not a finished emdpo-ray run (no posteriors.jsonl)")
    if a.print_config:
        print(yaml.safe_dump(serve_config(run_dir, "0.0.0.0", a.port), sort_keys=False))
        return 0
    url = start(run_dir, a.host, a.port)
    print(f"serving {run_dir} at {url}/v1 (Ctrl-C to stop)", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    serve.shutdown()
    print("stopped", flush=True)
    return 0
