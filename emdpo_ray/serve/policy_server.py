"""The `PolicyServer` deployment: the base and policies of a run, decoding batched requests.

LoRA runs get one replica set holding the base and all K adapters, which decodes concurrent
requests for any mix of types in one batched forward (`@serve.batch`, PEFT `adapter_names`
per row). Full fine-tuned runs get one deployment per type.
"""

import asyncio
import os
import threading

import numpy as np
from ray import serve

from emdpo_ray.models.decoding import GenRequest, GenResult, generate_batch, peft_forward, plain_forward


@serve.deployment(name="PolicyServer")
class PolicyServer:
    """Base + policies `names`; batches concurrent requests across them."""

    def __init__(self, run_dir: str, names: list[str], max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.005):
        import torch

        from emdpo_ray.run.rundir import RunDir

        rd = RunDir.open(run_dir)
        self.cfg = cfg = rd.config()
        self.tau = rd.reward_temperature()  # feedback is scored as the E-step scored rankings
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dirs = rd.policy_dirs()
        self.tok, self.bank = rd.load_bank(cfg, {n: dirs[n] for n in names})
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
        """Yield text deltas as they are decoded, then the GenResult."""
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
        """Plackett-Luce log-likelihood of a feedback ranking under each policy here, its
        rewards at the run's reward temperature."""
        import torch

        from emdpo_ray.core.losses import plackett_luce_logp
        from emdpo_ray.data.encode import encode
        from emdpo_ray.data.records import parse_record
        from emdpo_ray.models.scoring import pair_logps

        enc = encode([parse_record(record, "feedback")], self.tok, self.cfg.data)
        n = len(self.bank.names)
        pairs = np.array([(0, j) for j in range(n)] + [(0, -1)])
        with torch.no_grad(), self.lock:
            lp, _, mask = pair_logps(self.bank.logps, enc.arrays(), pairs, torch.device("cpu"))
        rewards = self.tau * self.cfg.dpo.beta * (lp[:n] - lp[n:])
        return plackett_luce_logp(rewards, mask[:n]).double().tolist()

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    def check_health(self):
        if self.bank is None:
            raise RuntimeError("policies not loaded")
