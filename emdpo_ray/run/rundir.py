"""The run directory: the one module that knows its file names and layout.

    rd = RunDir.open("s3://bucket/run")   # or a local path; a remote run is pulled first
    rd.config(), rd.types, rd.posteriors(), rd.policy_dirs(), rd.load_bank(cfg)

A remote run is worked on in a local mirror (`run/storage.py`) and pushed file by file;
data files go before `state.json`, so the remote state never points at a missing file.
Every file is written atomically. Other modules ask a `RunDir` for paths and contents and
never spell a file name themselves.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from emdpo_ray.config import Config, config_to_yaml, load_config
from emdpo_ray.run.storage import RunStore, is_remote
from emdpo_ray.utils import atomic_save_npy, atomic_write_json, atomic_write_text, read_json

# The layout (README "Run directory" lists the same).
RUN = "run.json"                    # identity: data path, K, resolved config
CONFIG = "config.yaml"
STATE = "state.json"                # resume point, written last in each iteration
HISTORY = "history.json"
POSTERIORS = "posteriors.jsonl"
SUMMARY = "summary.json"
MMRA = "mmra.json"
MMRA_SAMPLES = "mmra_samples.jsonl"
EVAL = "eval.json"                  # the last `emdpo-ray eval`
POLICIES = "policies"               # policies/type_<k>/
BASELINES = "baselines"             # baselines/single_dpo/
BASE_MODEL = "base_model"           # the default tiny model, built once per run
CACHE = "cache"                     # cache/ref_logps-<key>.npy
PLOTS = "plots"
ONLINE = "online"                   # online/wal.jsonl (s3: online/log/<seq>.json), online/snapshot.json
ONLINE_WAL = "wal.jsonl"
ONLINE_SNAPSHOT = "snapshot.json"
RAY_RESULTS = "ray_results"         # M-step checkpoints (stay remote for s3:// runs)
SINGLE_DPO = "single_dpo"
REFERENCE_NAME = "reference"        # the reference policy's name in samples and reports


class RunDirError(ValueError):
    """Not a (finished) run directory, or one holding another run."""


def type_name(k: int) -> str:
    """Policy k's name: its folder under policies/ and its PEFT adapter name."""
    return f"type_{k}"


def gamma_file(iteration: int) -> str:
    """Log-posteriors [U, K] after an iteration."""
    return f"log-gamma-{iteration:03d}.npy"


def is_leftover(name: str) -> bool:
    """A crash mid-write leaves these behind; they are never read."""
    return name.startswith(".tmp-") or ".partial" in name


class RunDir:
    def __init__(self, uri: str):
        self.uri = uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))
        self.store = RunStore(self.uri)
        self.path = self.store.local
        self.remote = self.store.remote

    @classmethod
    def open(cls, uri: str) -> RunDir:
        """An existing run, pulled to this node when remote."""
        rd = cls(uri)
        rd.pull()
        return rd

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # -- storage --
    def pull(self) -> None:
        self.store.pull(skip=(RAY_RESULTS + "/", ONLINE + "/"), always=(STATE,))

    def push(self, *names: str) -> None:
        self.store.push(*names)

    def push_all(self) -> None:
        """Everything, `state.json` last."""
        if self.remote:
            self.push(*[n for n in os.listdir(self.path) if n != STATE])
            self.push(STATE)

    def ray_storage(self, cfg: Config) -> str:
        """Where the M-steps keep their checkpoints (train/mstep.py)."""
        if cfg.ray.storage_path:
            sp = cfg.ray.storage_path
            return sp.rstrip("/") if "://" in sp else os.path.abspath(sp)
        return f"{self.uri}/{RAY_RESULTS}" if self.remote else self.file(RAY_RESULTS)

    # -- identity --
    def exists(self) -> bool:
        return os.path.exists(self.file(RUN))

    def is_finished(self) -> bool:
        return os.path.exists(self.file(POSTERIORS))

    def require_run(self) -> RunDir:
        if not self.exists():
            raise RunDirError(f"{self.uri}: not an emdpo-ray run directory (no {RUN})")
        return self

    def require_finished(self) -> RunDir:
        if not self.is_finished():
            raise RunDirError(f"{self.uri}: not a finished emdpo-ray run (no {POSTERIORS})")
        return self

    def create_or_resume(self, identity: dict, overwrite: bool) -> bool:
        """Create or validate the run directory. Returns True when resuming."""
        if overwrite:
            self.store.delete()
        self.pull()
        if os.path.exists(self.file(RUN)):
            if read_json(self.file(RUN)) != identity:
                raise RunDirError(
                    f"{self.uri}: holds a run with a different config or data; use another "
                    "--out or pass --overwrite to start over")
            for name in os.listdir(self.path):
                if is_leftover(name):
                    path = self.file(name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            return os.path.exists(self.file(STATE))
        if os.path.isdir(self.path) and os.listdir(self.path):
            raise RunDirError(f"{self.uri}: exists and is not an emdpo-ray run directory; use "
                              "another --out or pass --overwrite")
        os.makedirs(self.path, exist_ok=True)
        atomic_write_json(self.file(RUN), identity)
        return False

    def identity(self) -> dict:
        return read_json(self.require_run().file(RUN))

    @property
    def types(self) -> int:
        """K: as given to `train`, or with `--types auto` as the start chose it (the mixing
        weights of the last finished iteration)."""
        k = self.identity()["types"]
        if k != "auto":
            return k
        state = self.state()
        if state is None:
            raise RunDirError(f"{self.uri}: --types auto and no iteration finished yet, so "
                              "no K has been chosen")
        return len(state["eta"])

    @property
    def data_path(self) -> str:
        return self.identity()["data"]

    # -- config --
    def config(self) -> Config:
        return load_config(self.file(CONFIG))

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.file(CONFIG), config_to_yaml(cfg))
        self.push(RUN, CONFIG)

    # -- EM state (resume) --
    def state(self) -> dict | None:
        """The last finished iteration, None before the first."""
        if not os.path.exists(self.file(STATE)):
            return None
        try:
            return read_json(self.file(STATE))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not ours: ours are atomic
            raise RunDirError(f"{self.file(STATE)}: unreadable ({e}); pass --overwrite to "
                              "start over") from None

    def save_iteration(self, iteration: int, log_gamma: np.ndarray, history: list[dict],
                       state: dict, before_state=lambda: None,
                       heldout_per_user: np.ndarray | None = None) -> None:
        """log-posteriors (and the guard's per-user baseline, when given), history, then
        state.json (the resume point), each atomic and pushed in that order; `before_state`
        runs between the two (crash tests)."""
        name = gamma_file(iteration)
        atomic_save_npy(self.file(name), log_gamma)
        names, extra = [name], {}
        if heldout_per_user is not None:
            extra["heldout_per_user"] = f"heldout-per-user-{iteration:03d}.npy"
            atomic_save_npy(self.file(extra["heldout_per_user"]), heldout_per_user)
            names.append(extra["heldout_per_user"])
        atomic_write_json(self.file(HISTORY), history)
        before_state()
        self.push(*names, HISTORY, CACHE)
        atomic_write_json(self.file(STATE), {**state, **extra, "iteration": iteration,
                                             "log_gamma": name})
        self.push(STATE)

    def load_log_gamma(self, state: dict) -> np.ndarray:
        """[U, K] log-posteriors of the iteration `state` points at."""
        return np.load(self.file(state["log_gamma"]))

    def load_heldout_per_user(self, state: dict) -> np.ndarray | None:
        """[U] held-out log-likelihoods of the model behind the types `state` holds (the
        guard's baseline), None when the run kept none."""
        name = state.get("heldout_per_user")
        return np.load(self.file(name)) if name else None

    def history(self) -> list[dict]:
        return read_json(self.file(HISTORY)) if os.path.exists(self.file(HISTORY)) else []

    # -- results --
    def write_posteriors(self, users: list[str], log_gamma: np.ndarray) -> None:
        """`posterior` (may underflow to 0 for users with many records) and the exact
        `log_posterior`, one user a line."""
        lines = [json.dumps({"user_id": u, "posterior": np.exp(lg).tolist(),
                             "log_posterior": lg.tolist(), "type": int(lg.argmax())})
                 for u, lg in zip(users, log_gamma)]
        atomic_write_text(self.file(POSTERIORS), "\n".join(lines) + "\n")

    def _posterior_rows(self):
        with open(self.require_finished().file(POSTERIORS), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def posteriors(self) -> dict[str, list[float]]:
        return {row["user_id"]: row["posterior"] for row in self._posterior_rows()}

    def log_posteriors(self) -> dict[str, list[float]]:
        """Exact log-posteriors (from `posterior` for runs written before they were kept)."""
        out = {}
        for row in self._posterior_rows():
            lp = row.get("log_posterior")
            if lp is None:
                with np.errstate(divide="ignore"):
                    lp = np.log(np.asarray(row["posterior"], float)).tolist()
            out[row["user_id"]] = lp
        return out

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.file(SUMMARY), summary)

    def summary(self) -> dict:
        return read_json(self.file(SUMMARY))

    def mixing_weights(self) -> list[float]:
        return self.summary()["mixing_weights"]

    def reward_temperature(self) -> float:
        """The scale of the policies' rewards behind the final types (1 for runs from before
        it was kept, which all scored at 1)."""
        return float(self.summary().get("reward_temperature", 1.0))

    def write_mmra(self, result: dict, samples: list[dict]) -> None:
        atomic_write_text(self.file(MMRA_SAMPLES), "".join(json.dumps(s) + "\n" for s in samples))
        atomic_write_json(self.file(MMRA), result)

    def mmra(self) -> dict | None:
        return read_json(self.file(MMRA)) if os.path.exists(self.file(MMRA)) else None

    def mmra_weights(self) -> list[float]:
        """MMRA's mixture, uniform when MMRA has not run."""
        mm = self.mmra()
        return mm["weights"] if mm else [1.0 / self.types] * self.types

    def mmra_samples(self) -> list[dict] | None:
        if not os.path.exists(self.file(MMRA_SAMPLES)):
            return None
        with open(self.file(MMRA_SAMPLES), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def write_eval(self, result: dict) -> None:
        atomic_write_json(self.file(EVAL), result)
        self.push(EVAL)

    def eval(self) -> dict | None:
        return read_json(self.file(EVAL)) if os.path.exists(self.file(EVAL)) else None

    @property
    def plots_dir(self) -> str:
        return self.file(PLOTS)

    @property
    def online_dir(self) -> str:
        return self.file(ONLINE)

    def online_journal(self):
        """Durable log of the online user state: on the run's shared storage for a remote
        run (any node recovers it), an fsynced local file otherwise."""
        from emdpo_ray.run.journal import LocalJournal, ObjectJournal

        if self.remote:
            return ObjectJournal(self.store, ONLINE, ONLINE_SNAPSHOT)
        return LocalJournal(self.online_dir, ONLINE_WAL, ONLINE_SNAPSHOT)

    # -- models --
    def base_path(self, cfg: Config) -> str:
        """A named model used as is (resolved where it is loaded), or this run's own
        base_model/ (the tiny model, or a named model after SFT)."""
        if cfg.model.name_or_path and not cfg.model.sft_epochs:
            return cfg.model.name_or_path
        return self.file(BASE_MODEL)

    @property
    def base_model_dir(self) -> str:
        return self.file(BASE_MODEL)

    @property
    def base_init_dir(self) -> str:
        """Scratch for the tiny model before SFT (a leftover, removed on resume)."""
        return self.file(BASE_MODEL + ".init.partial")

    def shared_base_path(self) -> str:
        """Push base_model/ (for s3://) and return where workers on any node load it."""
        self.push(BASE_MODEL)
        return self.shared_base(None)

    def shared_base(self, cfg: Config | None) -> str:
        """base_path as a task on any node reads it: the remote copy of base_model/ for an
        s3:// run (pushed by training), a named model as is."""
        if cfg is not None and self.base_path(cfg) != self.base_model_dir:
            return self.base_path(cfg)
        return f"{self.uri}/{BASE_MODEL}" if self.remote else self.base_model_dir

    def reference_cache(self, key: str) -> str:
        return self.file(CACHE, f"ref_logps-{key}.npy")

    def policy_dirs(self, k: int | None = None, baselines: bool = False) -> dict[str, str]:
        """{name: folder} for type_0..type_{K-1} (and the single-DPO baseline if trained)."""
        k = self.types if k is None else k
        dirs = {type_name(j): self.file(POLICIES, type_name(j)) for j in range(k)}
        if baselines and self.has_baseline(SINGLE_DPO):
            dirs[SINGLE_DPO] = self.file(BASELINES, SINGLE_DPO)
        return dirs

    def shared_policy_dirs(self, k: int | None = None, baselines: bool = False) -> dict[str, str]:
        """policy_dirs as a Ray task on any node can read them: the remote URIs of an
        s3:// run (each node pulls them into its own cache), local paths otherwise."""
        dirs = self.policy_dirs(k, baselines)
        if not self.remote:
            return dirs
        return {n: f"{self.uri}/{os.path.relpath(d, self.path)}" for n, d in dirs.items()}

    def has_baseline(self, name: str) -> bool:
        return os.path.isdir(self.file(BASELINES, name))

    def install_policies(self, src: str, names: list[str]) -> None:
        """Copy policies/<name> folders from a checkpoint directory into policies/, whole."""
        tmp = self.file(POLICIES + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for n in names:
            shutil.copytree(os.path.join(src, POLICIES, n), os.path.join(tmp, n))
        shutil.rmtree(self.file(POLICIES), ignore_errors=True)
        os.replace(tmp, self.file(POLICIES))

    def install_baseline(self, src: str, name: str) -> str:
        """Copy a checkpoint's policies/<name> to baselines/<name>, whole."""
        out = self.file(BASELINES, name)
        shutil.rmtree(out + ".partial", ignore_errors=True)
        shutil.copytree(os.path.join(src, POLICIES, name), out + ".partial")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out + ".partial", out)
        self.push(BASELINES)  # read next by MMRA's tasks, on any node
        return out

    def load_bank(self, cfg: Config, dirs: dict[str, str] | None = None):
        """(tokenizer, PolicyBank in eval mode) holding the base and the run's policies."""
        from emdpo_ray.models.bank import load_policy_bank

        dirs = self.policy_dirs() if dirs is None else dirs
        return load_policy_bank(self.base_path(cfg), cfg.model, dirs)
