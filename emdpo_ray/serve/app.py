"""The Serve application of a run: the K policies behind the MMRA router.

    emdpo-ray serve --run runs/demo/run --port 8000
    emdpo-ray serve --run s3://bucket/run --print-config   # for `serve deploy` / RayService

`app_builder` is a typed Serve application builder (`import_path:
emdpo_ray.serving:app_builder`, `args: {run_dir: ...}`): a bad `args` fails with the field's
name before any replica starts.
"""

import os
import signal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from emdpo_ray.config import ConfigError, DeploymentSettings
from emdpo_ray.run.rundir import RunDir, type_name
from emdpo_ray.run.storage import is_remote
from emdpo_ray.serve.policy_server import PolicyServer
from emdpo_ray.serve.router import Router

IMPORT_PATH = "emdpo_ray.serving:app_builder"  # the public path RayService manifests name


class AppArgs(BaseModel):
    """Arguments of `app_builder` (a Serve config's `args`)."""
    model_config = ConfigDict(extra="forbid")
    run_dir: str = Field(description="a finished run directory: a local path or s3://...")

    @field_validator("run_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return v if is_remote(v) else os.path.abspath(v)


def deployment_options(d: DeploymentSettings) -> dict:
    opts = {"ray_actor_options": d.ray_actor_options,
            "max_ongoing_requests": d.max_ongoing_requests,
            "health_check_period_s": d.health_check_period_s}
    if d.num_replicas:
        opts["num_replicas"] = d.num_replicas
    else:
        opts["autoscaling_config"] = d.autoscaling_config
    return opts


def app_builder(args: AppArgs):
    """One `PolicyServer` holding every adapter (LoRA) or one per type (full models), and the
    Router in front of them."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    rd = RunDir.open(args.run_dir).require_finished()
    cfg, k = rd.config(), rd.types
    names = [type_name(j) for j in range(k)]
    sv = cfg.serve
    popts = deployment_options(sv.policy)
    if cfg.model.finetune == "lora":
        handles = [PolicyServer.options(**popts).bind(args.run_dir, names, sv.max_batch_size,
                                                      sv.batch_wait_timeout_s)]
        type_map = [(0, j) for j in range(k)]
    else:
        handles = [PolicyServer.options(name=f"PolicyServer_{n}", **popts).bind(
            args.run_dir, [n], sv.max_batch_size, sv.batch_wait_timeout_s) for n in names]
        type_map = [(j, 0) for j in range(k)]
    return Router.options(**deployment_options(sv.router)).bind(args.run_dir, handles, type_map)


def serve_config(run_dir: str, host: str = "0.0.0.0", port: int = 8000) -> dict:
    """A Serve config (serve deploy / RayService serveConfigV2) for this run."""
    rd = RunDir.open(run_dir)
    cfg = rd.config()
    sv = cfg.serve
    deployments = [{"name": "Router", **deployment_options(sv.router)}]
    if cfg.model.finetune == "lora":
        deployments.append({"name": "PolicyServer", **deployment_options(sv.policy)})
    else:
        deployments += [{"name": f"PolicyServer_{type_name(j)}", **deployment_options(sv.policy)}
                        for j in range(rd.types)]
    return {"proxy_location": sv.proxy_location, "http_options": {"host": host, "port": port},
            "applications": [{"name": "emdpo", "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": {"run_dir": rd.uri}, "deployments": deployments}]}


PORT_TRIES = 3


class PortTaken(ConfigError):
    """Serve's proxy could not bind its port (the CLI says so and exits 2, as for any bad
    option)."""


def first_bound(bind, port: int, pick, tries: int = PORT_TRIES) -> int:
    """`bind(p)` on `port`, or with port 0 on ports from `pick()` until one binds (a free port
    can be taken by another process before the proxy binds it); returns the bound port."""
    for _ in range(0 if port else tries - 1):
        p = pick()
        try:
            bind(p)
            return p
        except PortTaken:
            continue
    p = port or pick()
    bind(p)
    return p


def start(run_dir: str, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False):
    """Deploy on the current (or a new local) Ray; returns the base URL. Port 0: a free
    one, picked once Ray is up (starting Ray binds ports of its own)."""
    from ray.exceptions import RayTaskError

    from emdpo_ray.run.ray_runtime import RayRuntime
    from emdpo_ray.utils import free_port

    args = AppArgs(run_dir=run_dir)
    cfg = RunDir.open(args.run_dir).config()
    RayRuntime(cfg, verbose)

    def bind(p: int) -> None:
        try:
            serve.start(proxy_location=cfg.serve.proxy_location,
                        http_options={"host": host, "port": p})
        except RayTaskError as e:
            if "Failed to bind" not in str(e):
                raise
            serve.shutdown()
            raise PortTaken(f"{host}:{p} is in use: choose another --port") from None

    port = first_bound(bind, port, free_port)
    serve.run(app_builder(args), name="emdpo", route_prefix="/")
    return f"http://{host}:{port}"


def serve_main(a) -> int:
    """`emdpo-ray serve`: deploy and wait for Ctrl-C / SIGTERM, or print the Serve config."""
    import yaml

    if not a.print_config:
        # Block SIGINT/SIGTERM before any thread starts (threads inherit the mask) and wait
        # for them below, so Ray's fatal-signal handler never sees them: a clean shutdown.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    rd = RunDir.open(a.run).require_finished()
    if a.print_config:
        if not a.port:
            raise ConfigError("--port 0 picks a free port when serving here; a Serve config "
                              "needs a fixed one")
        print(yaml.safe_dump(serve_config(rd.uri, "0.0.0.0", a.port), sort_keys=False))
        return 0
    url = start(rd.uri, a.host, a.port)
    print(f"serving {rd.uri} at {url}/v1 (Ctrl-C to stop)", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    serve.shutdown()
    print("stopped", flush=True)
    return 0
