"""`make demo`'s wall time after setup: `.venv/bin/python bench/demo_wall.py` -> demo_wall_s."""

import subprocess
import time

from common import REPO, record

if __name__ == "__main__":
    t = time.perf_counter()
    subprocess.run(["make", "-s", "demo"], cwd=REPO, check=True, capture_output=True)
    record({"demo_wall_s": time.perf_counter() - t})
