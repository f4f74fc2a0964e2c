"""A three-node Ray cluster on one machine: a head and two worker nodes (`ray start`
processes, each with its own temp dir and its own EMDPO_CACHE), a real S3 API (moto), and a
run trained, MMRA'd, evaluated and served with `--out s3://...` across the nodes.

Then the policy deployment is driven to scale out (a replica on the other node) and back in,
and the node holding the online user-state actor is SIGKILLed (its raylet and every process
it started): every acknowledged feedback must still be there, and completions keep coming.
Figures go to runs/reliability/report.json (README, reliability table)."""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil
import pytest

from emdpo_ray.utils import free_port
from test_cluster import BIN, _wait_http, s3  # noqa: F401  (s3: the moto fixture)

MONITOR = r"""
import json, sys, time
import ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    try:
        acts = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000)
        pol = [a.node_id for a in acts if "PolicyServer" in (a.class_name or "")]
        st = [a.node_id for a in acts if (a.name or "").startswith("emdpo-users-")]
        print(json.dumps({"t": time.time(), "policy_nodes": pol, "state_nodes": st}), flush=True)
    except Exception as e:
        print(json.dumps({"t": time.time(), "error": str(e)[:200]}), flush=True)
    time.sleep(1)
"""


class Node:
    def __init__(self, name, proc, manager_port, cache, temp):
        self.name, self.proc, self.manager_port, self.cache = name, proc, manager_port, cache
        self.temp = temp

    def processes(self) -> list:
        """`ray start`, every process naming this node's temp dir (raylet, agents), and
        everything below them (the raylet's workers, whatever their process title)."""
        roots = [self.proc.pid] + [p.pid for p in psutil.process_iter(["cmdline"])
                                   if self.temp in " ".join(p.info["cmdline"] or [])]
        out = {}
        for pid in roots:
            try:
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    out[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        return list(out.values())

    def kill(self):
        """SIGKILL the node: its raylet and every process it started."""
        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


@pytest.fixture
def cluster(s3, tmp_path):  # noqa: F811  (the fixture above)
    """Head (no CPUs: the driver's node) + worker nodes a, b (1 CPU and a `state_host`
    resource each), every node with its own temp dir and cache."""
    env = {**s3, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "")}
    gcs = free_port()
    temps, nodes = [], {}

    def start(name, head):
        temp = tempfile.mkdtemp(prefix=f"rmn{name}-", dir="/tmp")  # short socket paths
        temps.append(temp)
        cache = str(tmp_path / f"cache-{name}")
        mport = free_port()
        args = [f"{BIN}/ray", "start", "--block", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                f"--node-manager-port={mport}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        if head:
            args += ["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"]
        else:
            args += [f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                     '--resources={"state_host": 1}']
        proc = subprocess.Popen(args, env={**env, "EMDPO_CACHE": cache},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        nodes[name] = Node(name, proc, mport, cache, temp)

    def alive_nodes():
        out = subprocess.run([sys.executable, "-c", (
            "import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([[n['NodeManagerPort'], n['NodeID']] for n in ray.nodes() "
            "if n['Alive']]))") % f"127.0.0.1:{gcs}"], env=env, capture_output=True, text=True,
            timeout=120)
        # the JSON line, or nothing yet: a node coming up can print its own log lines (a
        # raylet's stack trace) to the probe's stdout
        for line in reversed(out.stdout.strip().splitlines() if out.returncode == 0 else []):
            if line.startswith("[["):
                return dict(json.loads(line))
        return {}

    try:
        start("head", True)
        time.sleep(3)
        start("a", False)
        start("b", False)
        deadline = time.time() + 180
        while len(alive_nodes()) < 3:
            assert time.time() < deadline, "the three nodes did not come up"
            time.sleep(2)
        ids = alive_nodes()
        for n in nodes.values():
            n.node_id = ids[n.manager_port]
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "nodes": nodes,
               "start": start, "alive": alive_nodes}
    finally:
        for n in nodes.values():
            n.kill()
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def _journal_ms(cluster) -> dict:
    """The state actor's own measure of its S3 journal writes (one PUT per feedback)."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "a = [x for x in ray.util.list_named_actors(all_namespaces=True) "
            "if x['name'].startswith('emdpo-users-')][0]; "
            "print(json.dumps(ray.get(ray.get_actor(a['name'], namespace=a['namespace'])"
            ".stats.remote())))") % cluster["address"]
    out = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _state_actor_node(cluster) -> str | None:
    """Node id of the live user-state actor, asked of the cluster now."""
    code = ("import json, ray; from ray.util.state import list_actors; "
            "ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([a.node_id for a in list_actors(address=%r, filters=[('state', '=', "
            "'ALIVE')], limit=1000) if (a.name or '').startswith('emdpo-users-')]))") % (
                cluster["address"], cluster["address"])
    out = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True,
                         text=True, timeout=120)
    found = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
    return found[0] if found else None


def _post_timed(client, path, body):
    t = time.perf_counter()
    r = client.post(path, json=body)
    return r, (time.perf_counter() - t) * 1000


@pytest.mark.heavy
def test_three_nodes_train_serve_autoscale_and_lose_the_state_node(cluster, tmp_path,
                                                                   reliability_report):
    from emdpo_ray.data import synth

    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"],
           "EMDPO_CACHE": str(tmp_path / "cache-driver")}
    data = str(tmp_path / "d.jsonl")
    synth.write(data, *synth.generate(users=16, types=2, rankings_per_user=4, seed=2))
    sets = ["em.max_iterations=1", "dpo.min_steps=10", "ray.num_workers=2",
            "ray.cpus_per_worker=1", "mmra.num_prompts=2", "mmra.max_new_tokens=8",
            "mmra.bootstrap=20", "mmra.single_dpo_baseline=false",
            "serve.proxy_location=HeadOnly",
            "serve.state_actor_options={resources: {state_host: 0.01}}",
            "serve.policy.ray_actor_options={num_cpus: 0.6}",  # two do not fit one node
            "serve.router.ray_actor_options={num_cpus: 0.1}",
            "serve.policy.autoscaling_config={min_replicas: 1, max_replicas: 2, "
            "target_ongoing_requests: 1, upscale_delay_s: 1, downscale_delay_s: 8, "
            "metrics_interval_s: 0.5, look_back_period_s: 2}"]
    cmd = [f"{BIN}/emdpo-ray", "train", "--data", data, "--types", "2", "--out", "s3://runs/mn"]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    # The M-step ran on both worker nodes, each reading the base model into its own cache.
    for name in ("a", "b"):
        assert os.path.isdir(os.path.join(cluster["nodes"][name].cache, "runs")), name

    # The driver's mirror is gone: MMRA and eval read the run from S3 on whatever node.
    shutil.rmtree(env["EMDPO_CACHE"])
    for args in (["mmra", "--run", "s3://runs/mn"],
                 ["eval", "--run", "s3://runs/mn", "--data", data, "--format", "json"]):
        p = subprocess.run([f"{BIN}/emdpo-ray", *args], env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, (args, p.stderr[-4000:])
    shutil.rmtree(env["EMDPO_CACHE"])

    port = free_port()
    srv = subprocess.Popen([f"{BIN}/emdpo-ray", "serve", "--run", "s3://runs/mn", "--port",
                            str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    mon = subprocess.Popen([sys.executable, "-c", MONITOR, cluster["address"]],
                           env=cluster["env"], stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    samples: list[dict] = []
    threading.Thread(target=lambda: [samples.append(json.loads(line)) for line in mon.stdout],
                     daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/v1/completions", timeout=300, method="post",
                   json={"prompt": "Explain rivers.", "max_tokens": 2})
        client = httpx.Client(base_url=url, timeout=120)

        # -- autoscaling: a load ramp, then idle --
        outcomes, stop = [], threading.Event()

        def load():
            c = httpx.Client(base_url=url, timeout=120)
            while not stop.is_set():
                r = c.post("/v1/completions", json={"prompt": "Explain tides.",
                                                    "max_tokens": 16})
                outcomes.append((time.time(), r.status_code))

        t_load = time.time()
        threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        scaled_out = None
        deadline = time.time() + 240
        while time.time() < deadline and scaled_out is None:
            time.sleep(1)
            live = [s for s in samples if s.get("t", 0) > t_load and len(s.get("policy_nodes", [])) >= 2]
            if live:
                scaled_out = live[0]
        stop.set()
        for t in threads:
            t.join()
        assert scaled_out is not None, samples[-5:]
        assert len(set(scaled_out["policy_nodes"])) == 2   # the new replica on the other node
        t_idle = time.time()
        scaled_in = None
        deadline = time.time() + 240
        while time.time() < deadline and scaled_in is None:
            time.sleep(1)
            idle = [s for s in samples if s.get("t", 0) > t_idle and len(s.get("policy_nodes", [0, 0])) == 1]
            if idle:
                scaled_in = idle[0]
        assert scaled_in is not None, samples[-5:]
        failed = [o for o in outcomes if o[1] != 200]
        assert outcomes and not failed, failed[:5]

        # -- acknowledged feedback, then the state node is lost --
        rng = __import__("numpy").random.default_rng(5)
        meta = json.load(open(synth.meta_path(data)))
        acked, lat = {}, []
        for i in range(24):
            user = f"mn-user-{i % 4}"
            rec = synth.user_records(rng, __import__("numpy").asarray(meta["theta"]),
                                     meta["reward_scale"], i % 2, user, 1, 3)[0]
            body = {k: v for k, v in rec.items() if k not in ("user_id", "true_type")}
            r, ms = _post_timed(client, "/v1/feedback", {"user": user, **body})
            assert r.status_code == 200, r.text
            acked[user] = r.json()["feedbacks"]
            lat.append(ms)
        before = {u: client.get(f"/v1/users/{u}").json() for u in acked}
        journal = _journal_ms(cluster)
        state_node = [s for s in samples if s.get("state_nodes")][-1]["state_nodes"][0]
        victim = [n for n in cluster["nodes"].values() if n.node_id == state_node]
        assert victim and victim[0].name in ("a", "b"), (state_node, samples[-1])
        t_kill = time.time()
        killed = victim[0].processes()
        assert any("raylet" in " ".join(p.cmdline()) for p in killed)
        victim[0].kill()
        _, alive = psutil.wait_procs(killed, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        deadline = time.time() + 180
        while victim[0].node_id in cluster["alive"]():
            assert time.time() < deadline, "Ray never noticed the node was gone"
            time.sleep(2)
        node_dead_s = time.time() - t_kill
        recovered = None
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                after = {u: client.get(f"/v1/users/{u}") for u in acked}
                if all(r.status_code == 200 for r in after.values()):
                    recovered = time.time() - t_kill
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert recovered is not None, "user state did not come back"
        for u, n in acked.items():
            got = after[u].json()
            assert got["feedbacks"] == n, (u, got, n)
            assert got["posterior"] == pytest.approx(before[u]["posterior"], abs=1e-9)
        # completions keep being answered (replicas on the lost node are replaced)
        deadline = time.time() + 300
        answered = 0
        while time.time() < deadline and answered < 5:
            r = client.post("/v1/completions", json={"prompt": "Explain ice.", "max_tokens": 4})
            answered += r.status_code == 200
            if r.status_code != 200:
                time.sleep(1)
        assert answered == 5
        # the state actor now lives on the surviving worker node
        deadline, where = time.time() + 120, None
        while time.time() < deadline:
            where = _state_actor_node(cluster)
            if where and where != state_node:
                break
            time.sleep(2)
        survivor = [n for n in cluster["nodes"].values() if n.name in ("a", "b") and n is not victim[0]]
        assert where == survivor[0].node_id, (where, state_node)

        q = statistics.quantiles(lat, n=100)
        reliability_report("multinode", {
            "nodes": 3, "feedbacks_acknowledged": sum(acked.values()),
            "feedbacks_lost_after_state_node_kill": 0,
            "feedback_ms_p50_s3": round(statistics.median(lat), 1),
            "feedback_ms_p99_s3": round(q[98], 1),
            "journal_put_ms_p50": round(journal["journal_ms_p50"], 1),
            "journal_put_ms_p99": round(journal["journal_ms_p99"], 1),
            "policy_replicas_over_time": [
                [round(x["t"] - t_load, 1), len(x["policy_nodes"])] for x in samples
                if "policy_nodes" in x and t_load <= x["t"] <= scaled_in["t"]],
            "state_recovery_s": round(recovered, 1), "node_death_noticed_s": round(node_dead_s, 1),
            "scale_out_s": round(scaled_out["t"] - t_load, 1),
            "scale_in_s": round(scaled_in["t"] - t_idle, 1),
            "requests_during_scaling": len(outcomes), "failed_requests": len(failed)})
    finally:
        mon.kill()
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
