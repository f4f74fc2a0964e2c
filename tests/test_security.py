"""What may load, run, listen and answer: pickles, remote code, config values, auth, binds."""

import ast
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

from emdpo_ray.config import ConfigError, ModelConfig, load_config
from emdpo_ray.models.loading import load_base, UnsafeModelError
from emdpo_ray.models.tiny import build_tiny_model

from conftest import KEY

PKG = pathlib.Path(__file__).resolve().parents[1] / "emdpo_ray"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    build_tiny_model(["a tiny corpus of words", "for a tiny tokenizer"] * 20, path, ModelConfig(), 0)
    return path


def _pickle_copy(src: str, dst: pathlib.Path) -> pathlib.Path:
    """The same model with its weights as a pickle (pytorch_model.bin) only."""
    from safetensors.torch import load_file

    dst.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            (dst / f).write_bytes(pathlib.Path(src, f).read_bytes())
    torch.save(load_file(os.path.join(src, "model.safetensors")), dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused_unless_allowed(tiny_dir, tmp_path):
    pk = _pickle_copy(tiny_dir, tmp_path / "pickled")
    with pytest.raises(UnsafeModelError, match=r"pytorch_model\.bin.*model\.allow_pickle"):
        load_base(str(pk), ModelConfig())
    allowed = load_base(str(pk), ModelConfig(allow_pickle=True))
    ref = load_base(tiny_dir, ModelConfig())
    for (n, a), (_, b) in zip(allowed.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_pickle_adapter_is_refused(tiny_dir, tmp_path):
    from emdpo_ray.models.bank import PolicyBank

    cfg = ModelConfig()
    bank = PolicyBank(load_base(tiny_dir, cfg), cfg, ["type_0"])
    bank.save(str(tmp_path / "policies"))
    ad = tmp_path / "policies" / "type_0"
    from safetensors.torch import load_file

    torch.save(load_file(ad / "adapter_model.safetensors"), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeModelError, match="adapter_model.bin"):
        PolicyBank(load_base(tiny_dir, cfg), cfg, ["type_0"], init_from=str(tmp_path / "policies"))


def test_cli_refuses_pickle_model_with_exit_2_and_writes_nothing(tiny_dir, tmp_path, synth_data):
    pk = _pickle_copy(tiny_dir, tmp_path / "pickled")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "emdpo_ray", "train", "--data", synth_data,
                        "--types", "2", "--out", str(out), "--set", f"model.name_or_path={pk}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model.allow_pickle" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "state.json").exists()


def test_remote_code_never_runs_unless_trusted(tiny_dir, tmp_path):
    """A model folder whose config asks for its own code: refused, and the code never runs."""
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in os.listdir(tiny_dir):
        (evil / f).write_bytes(pathlib.Path(tiny_dir, f).read_bytes())
    marker = tmp_path / "code-ran"
    (evil / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import LlamaForCausalLM as EvilModel\n")
    conf = json.loads((evil / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        load_base(str(evil), ModelConfig())
    assert not marker.exists()
    # Off by default, including in every shipped job config.
    assert ModelConfig().trust_remote_code is False
    for job in pathlib.Path(PKG.parent, "jobs").glob("*.yaml"):
        assert load_config(str(job)).model.trust_remote_code is False, job


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else (
                f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else "")
            yield name, node


def test_no_code_path_evaluates_or_shells_out():
    """No eval/exec, no shell, no unsafe YAML or pickle loads anywhere in the package."""
    banned = {"eval", "exec", "compile", "os.system", "os.popen", "pickle.load", "pickle.loads",
              "yaml.load", "yaml.unsafe_load", "marshal.loads"}
    found = []
    for path in PKG.glob("*.py"):
        for name, node in _calls(ast.parse(path.read_text(), str(path))):
            if name in banned:
                found.append(f"{path.name}:{node.lineno}: {name}")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{path.name}:{node.lineno}: shell=")
            if name == "torch.load" and not any(
                    kw.arg == "weights_only" and getattr(kw.value, "value", None) is True
                    for kw in node.keywords):
                found.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
    assert not found, found


def test_config_values_are_data_not_code(tmp_path):
    marker = tmp_path / "ran"
    payload = f"$(touch {marker}); __import__('os').system('touch {marker}')"
    cfg = load_config(None, [f"serve.api_key={payload}", f"ray.storage_path={payload}"])
    assert cfg.serve.api_key == payload  # kept verbatim as a string
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config(str(evil))
    assert not marker.exists()


def test_auth_covers_every_route_but_healthz(server):
    import httpx

    url, client, _ = server
    schema = client.get("/openapi.json").json()
    routes = [(m.upper(), p.replace("{user_id}", "u1")) for p, ops in schema["paths"].items()
              for m in ops] + [("GET", "/openapi.json"), ("GET", "/v1/no-such-route")]
    assert len(routes) >= 7
    with httpx.Client(base_url=url, timeout=30) as anon:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = anon.request(method, path, headers=headers, json={})
                if path == "/healthz":
                    assert r.status_code == 200
                else:
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 200


_LISTEN = r"""
import json, psutil, ray, urllib.request, urllib.error
from emdpo_ray.config import load_config
from emdpo_ray.run.ray_runtime import RayRuntime
RayRuntime(load_config(None, ["ray.dashboard=true"]))
host, port = ray._private.worker.global_worker.node.webui_url.rsplit(":", 1)
binds = set()
for p in psutil.process_iter():
    try:
        binds |= {c.laddr.ip for c in p.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)}
    except psutil.Error:
        pass
try:  # the job API answers here (any HTTP status: token auth may refuse us)
    status = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=10).status
except urllib.error.HTTPError as e:
    status = e.code
import os, socket
ext = os.environ.get("EXTERNAL_IP")
try:  # the same port on this machine's outward address: nothing there
    socket.create_connection((ext, int(port)), timeout=2).close() if ext else None
    external = "connected" if ext else "no external address"
except OSError as e:
    external = f"refused: {e}"
print(json.dumps({"port": int(port), "binds": sorted(binds), "jobs_status": status,
                  "external": external}))
ray.shutdown()
"""


def _external_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outward interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.slow
def test_cli_local_ray_binds_dashboard_and_job_api_to_loopback():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "EXTERNAL_IP": _external_ip() or ""}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", _LISTEN], capture_output=True, text=True,
                       timeout=180, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["binds"] == ["127.0.0.1"], got
    assert 200 <= got["jobs_status"] < 500, got
    assert got["external"] != "connected", got
