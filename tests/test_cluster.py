"""Cluster operations: KubeRay manifests against the real CRDs, job configs, Serve config,
a real Ray job submission to a head on loopback, and s3:// run directories on a real S3 API."""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest
import yaml

from emdpo_ray.utils import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRDS = os.environ.get("KUBERAY_CRDS_DIR") or os.path.join(REPO, "..", "shared", "kuberay-crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
BIN = os.path.dirname(sys.executable)


def strict(schema):
    """CRD openAPIV3Schema -> JSON Schema: int-or-string, preserve-unknown-fields, and no
    unknown fields where the schema lists properties (so a misspelt field fails)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("x-kubernetes-preserve-unknown-fields", False):
        return {k: v for k, v in out.items() if k in ("description",)}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


_SCHEMAS = {}


def crd_schema(kind: str):
    if kind not in _SCHEMAS:
        path = os.path.join(CRDS, CRD_FILES[kind])
        if not os.path.exists(path):
            pytest.fail(f"KubeRay CRDs not found at {CRDS}: set KUBERAY_CRDS_DIR")
        crd = yaml.safe_load(open(path))
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        _SCHEMAS[kind] = strict(v1["schema"]["openAPIV3Schema"])
    return _SCHEMAS[kind]


def manifests():
    out = []
    for f in sorted(glob.glob(os.path.join(REPO, "cluster", "*.yaml"))):
        for doc in yaml.safe_load_all(open(f)):
            if doc and doc.get("apiVersion") == "ray.io/v1":
                out.append((os.path.basename(f), doc))
    return out


def test_every_purpose_has_a_manifest():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    kust = yaml.safe_load(open(os.path.join(REPO, "cluster", "kustomization.yaml")))
    for r in kust["resources"]:
        assert os.path.exists(os.path.join(REPO, "cluster", r))


@pytest.mark.parametrize("name,doc", manifests(), ids=[n for n, _ in manifests()])
def test_manifest_validates_against_kuberay_crd(name, doc):
    jsonschema.Draft7Validator(crd_schema(doc["kind"])).validate(doc)


def test_misspelt_field_fails():
    _, job = next((n, d) for n, d in manifests() if d["kind"] == "RayJob")
    bad = json.loads(json.dumps(job))
    bad["spec"]["shutdownAfterJobFinished"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinished"):
        jsonschema.Draft7Validator(crd_schema("RayJob")).validate(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(crd_schema("RayJob")).validate(bad)


def test_raycluster_shape():
    rc = next(d for _, d in manifests() if d["kind"] == "RayCluster")["spec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    for g in groups.values():
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] and res["limits"]


def test_rayjob_entrypoints_use_existing_job_configs():
    from emdpo_ray.config import load_config

    jobs = [d for _, d in manifests() if d["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        spec = job["spec"]
        for key in ("runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                    "activeDeadlineSeconds", "submissionMode"):
            assert key in spec, key
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["emdpo-ray", "train"]
        cfg = argv[argv.index("--config") + 1]
        assert cfg.startswith("jobs/") and os.path.exists(os.path.join(REPO, cfg))
        load_config(os.path.join(REPO, cfg))
        yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml"))))
def test_job_configs_validate(path):
    from emdpo_ray.config import load_config

    load_config(path)


def test_rayservice_serve_config_is_valid_and_imports():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    svc = next(d for _, d in manifests() if d["kind"] == "RayService")["spec"]
    cfg = yaml.safe_load(svc["serveConfigV2"])
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    mod, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(mod), attr))
    assert app["args"]["run_dir"].startswith("s3://")
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Router", "PolicyServer"}
    assert svc["upgradeStrategy"]["type"] == "NewCluster"


def _wait_http(url, timeout=120, method="get", ok=(200,), **kw):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = getattr(httpx, method)(url, timeout=10, **kw)
            if r.status_code in ok:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


@pytest.fixture
def ray_head():
    """A Ray head on loopback started by this test alone, torn down with its processes."""
    import shutil
    import tempfile

    gcs, dash = free_port(), free_port()
    # short: Ray's unix socket paths under the temp dir must stay under ~107 characters
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # a loopback-only test cluster: no token auth, so the Jobs API needs no token file
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp}", "--block", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # up when it answers at all (with Ray's token auth on, unauthenticated calls get 401)
        _wait_http(f"http://127.0.0.1:{dash}/api/version", ok=(200, 401))
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        current = "/tmp/ray/ray_current_cluster"
        if os.path.exists(current) and str(gcs) in open(current).read():
            os.remove(current)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_real_job_submission_then_serve_deploy(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    dash, env = ray_head
    data, run = tmp_path / "data.jsonl", tmp_path / "run"
    client = JobSubmissionClient(dash)
    entry = (f"emdpo-ray synth --out {data} --users 24 --types 2 --rankings-per-user 6 && "
             f"emdpo-ray train --config jobs/demo.yaml --data {data} --types 2 --out {run} "
             "--set em.max_iterations=1 --set dpo.min_steps=10 --set mmra.num_prompts=2 "
             "--set mmra.max_new_tokens=8 --set mmra.single_dpo_baseline=false "
             "--set ray.cpus_per_worker=1")
    runtime_env = {"working_dir": REPO, "excludes": [".venv", ".cache", "runs", ".git"]}
    deadline = time.time() + 120
    while True:  # the dashboard answers before the node's job agent has registered
        try:
            job = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
    for f in ("posteriors.jsonl", "history.json", "mmra.json", "policies/type_1/adapter_config.json"):
        assert (run / f).exists(), f

    port = free_port()
    cfg_text = subprocess.run([f"{BIN}/emdpo-ray", "serve", "--run", str(run), "--print-config",
                               "--port", str(port)], capture_output=True, text=True, check=True,
                              env=env).stdout
    cfg = yaml.safe_load(cfg_text)
    for d in cfg["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d.update(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([f"{BIN}/serve", "deploy", str(tmp_path / "serve.yaml"), "-a", dash],
                   check=True, env=env, capture_output=True)
    r = _wait_http(f"http://127.0.0.1:{port}/v1/completions", timeout=180, method="post",
                   json={"prompt": "Explain rivers.", "max_tokens": 4})
    assert r.headers["x-emdpo-type"] in ("0", "1")


@pytest.fixture
def s3(tmp_path):
    """A real S3 API (moto's server) on loopback, with a bucket."""
    port = free_port()
    proc = subprocess.Popen([f"{BIN}/moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "EMDPO_CACHE": str(tmp_path / "cache"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                             aws_secret_access_key="test",
                             region_name="us-east-1").create_bucket(Bucket="runs")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield env
    finally:
        proc.kill()
        proc.wait()


def _s3_keys(env):
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="runs")
    return {o["Key"] for p in pages for o in p.get("Contents", [])}


@pytest.mark.slow
def test_s3_run_directory_for_train_mmra_and_serve(s3, tmp_path):
    env = s3
    data = tmp_path / "d.jsonl"
    subprocess.run([f"{BIN}/emdpo-ray", "synth", "--out", str(data), "--users", "20", "--types",
                    "2", "--rankings-per-user", "6"], check=True, env=env, capture_output=True)
    # the data itself is read from S3 too
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").upload_file(
        str(data), "runs", "data/d.jsonl")
    p = subprocess.run(
        [f"{BIN}/emdpo-ray", "train", "--data", "s3://runs/data/d.jsonl", "--types", "2",
         "--out", "s3://runs/exp1", "--set", "em.max_iterations=1", "--set", "dpo.min_steps=10",
         "--set", "mmra.num_prompts=2", "--set", "mmra.max_new_tokens=8",
         "--set", "serve.policy.ray_actor_options={num_cpus: 0.5}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    keys = _s3_keys(env)
    for k in ("exp1/posteriors.jsonl", "exp1/history.json", "exp1/state.json", "exp1/mmra.json",
              "exp1/policies/type_0/adapter_model.safetensors", "exp1/base_model/config.json"):
        assert k in keys, sorted(keys)
    assert any(k.startswith("exp1/ray_results/") for k in keys)  # M-step checkpoints

    # MMRA again from the S3 run, on a fresh cache (another machine)
    env2 = {**env, "EMDPO_CACHE": str(tmp_path / "cache2")}
    p = subprocess.run([f"{BIN}/emdpo-ray", "mmra", "--run", "s3://runs/exp1"], env=env2,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(json.loads(p.stdout)["weights"]) == 2

    # serve the S3 run; SIGTERM shuts it down cleanly
    port = free_port()
    env3 = {**env, "EMDPO_CACHE": str(tmp_path / "cache3")}
    srv = subprocess.Popen([f"{BIN}/emdpo-ray", "serve", "--run", "s3://runs/exp1", "--port",
                            str(port)], env=env3, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        r = _wait_http(f"http://127.0.0.1:{port}/v1/completions", timeout=240, method="post",
                       json={"prompt": "Explain rivers.", "max_tokens": 4})
        assert r.headers["x-emdpo-type"] in ("0", "1")
        srv.send_signal(signal.SIGTERM)
        out, err = srv.communicate(timeout=120)
        assert srv.returncode == 0, err[-3000:]
        assert "stopped" in out
    finally:
        if srv.poll() is None:
            os.killpg(srv.pid, signal.SIGKILL)
