"""Small helpers shared by the driver, the workers and the server."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_npy(path: str, arr) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


FAULT_ENV = "EMDPO_FAULT"


def fault_point(name: str, iteration: int) -> None:
    """Crash testing: EMDPO_FAULT=<name>:<iteration> SIGKILLs this process here, mid-way
    through a phase too short to hit from outside (the E-step, the state write, SFT)."""
    if os.environ.get(FAULT_ENV) == f"{name}:{iteration}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def free_port() -> int:
    """A free TCP port on loopback (for local servers: demo, tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def quiet_ray_logs() -> None:
    """Silence Ray's own chatter unless --verbose; our progress display is enough."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass

    for name in ["ray", "ray.train", "ray.tune", "ray.data", "ray.serve", "deepspeed",
                 "DeepSpeed", "torch.distributed"]:
        logging.getLogger(name).setLevel(logging.ERROR)
