"""Supervised fine-tuning of the reference: the base learns the records' language first.

DPO moves a policy away from its reference by a reward; a random network as the reference
writes noise, and so does every policy built on it. The default tiny model, built from
scratch, is therefore trained as a language model on the records' own prompts and responses
before any DPO (`model.tiny.sft_epochs`); a named model can be too (`model.sft_epochs`,
default 0). Loss: mean next-token NLL of the response tokens (end-of-text included) given the
prompt, on every response (`model.sft_on: all`) or on each record's top-ranked one (`top`).

The training runs as one Ray task (any node, the GPU when `ray.use_gpu`) that streams its
progress through a Ray queue and returns the weights; the driver writes `base_model/`
atomically, so a crash during SFT leaves nothing and the same command redoes it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from emdpo_ray.config import Config


def sft_rows(resp_mask: np.ndarray, on: str) -> np.ndarray:
    """(record, response) pairs to train on: every real response, or the top-ranked one
    (responses are stored best first)."""
    if on == "top":
        return np.stack([np.arange(len(resp_mask)), np.zeros(len(resp_mask), int)], 1)
    rec, j = np.nonzero(resp_mask)
    return np.stack([rec, j], 1)


def sft_steps(num_rows: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * num_rows / batch_size))


def _sft_task(base_path: str, cfg_json: dict, arrays: dict, rows: np.ndarray, steps: int,
              lr: float, seed: int, threads: int, queue) -> dict:
    import torch

    from emdpo_ray.models.loading import load_base

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = Config.model_validate(cfg_json)
    device = torch.device("cuda") if cfg.ray.use_gpu else torch.device("cpu")
    model = load_base(base_path, cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    bs = cfg.model.sft_batch_size
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(rows))
                            for _ in range(math.ceil(steps * bs / len(rows)) + 1)])
    losses = []
    for step in range(steps):
        rec, j = rows[order[step * bs:(step + 1) * bs]].T
        att = arrays["attention_mask"][rec, j]
        t = int(att.sum(-1).max())
        ids = torch.as_tensor(arrays["input_ids"][rec, j, :t], dtype=torch.long, device=device)
        mask = torch.as_tensor(arrays["loss_mask"][rec, j, 1:t], dtype=torch.float32,
                               device=device)
        logits = model(input_ids=ids, attention_mask=torch.as_tensor(att[:, :t], device=device)
                       ).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                reduction="none")
        loss = (nll * mask).sum() / mask.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.dpo.max_grad_norm)
        opt.step()
        losses.append(float(loss))
        if queue is not None and (step % 5 == 4 or step == steps - 1):
            queue.put((step + 1, float(np.mean(losses[-5:]))))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state_dict": state, "losses": losses}


def run_sft(cfg: Config, src: str, out_dir: str, arrays: dict, epochs: float, rt,
            say=lambda m: None, progress=None, before_save=lambda: None) -> dict:
    """Fine-tune the model at `src` on `arrays` (data/encode.py layout) and save it with its
    tokenizer to `out_dir`, atomically. Returns a summary (also `emdpo_sft.json` there).
    `progress(done, total, loss)` is called as steps finish."""
    import os
    import shutil

    from ray.util.queue import Empty, Queue

    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.utils import atomic_write_json

    mc = cfg.model
    rows = sft_rows(arrays["resp_mask"], mc.sft_on)
    steps = sft_steps(len(rows), mc.sft_batch_size, epochs)
    lr = mc.sft_learning_rate or (5e-3 if not mc.name_or_path else 2e-5)
    t0 = time.perf_counter()
    queue = Queue()
    task = rt.ray.remote(num_cpus=rt.threads, num_gpus=1 if cfg.ray.use_gpu else 0)(_sft_task)
    ref = task.remote(src, cfg.model_dump(mode="json"), arrays, rows, steps, lr, cfg.seed,
                      rt.threads, queue)
    while True:
        done, _ = rt.ray.wait([ref], timeout=0.5)
        try:
            while True:
                step, loss = queue.get_nowait()
                if progress:
                    progress(step, steps, loss)
        except Empty:
            pass
        if done:
            break
    out = rt.ray.get(ref)
    rt.ray.kill(queue.actor)
    before_save()
    model = load_base(src, mc)
    model.load_state_dict(out["state_dict"])
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(src, mc).save_pretrained(tmp)
    losses = out["losses"]
    k = max(1, min(10, len(losses) // 10))
    summary = {"on": mc.sft_on, "epochs": epochs, "steps": steps, "rows": int(len(rows)),
               "learning_rate": lr, "loss_first": float(np.mean(losses[:k])),
               "loss_last": float(np.mean(losses[-k:])), "wall_s": time.perf_counter() - t0,
               "losses": [float(x) for x in losses]}
    atomic_write_json(os.path.join(tmp, "emdpo_sft.json"), summary)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    say(f"SFT reference: {steps} steps on {len(rows)} responses ({mc.sft_on}), loss "
        f"{summary['loss_first']:.2f} -> {summary['loss_last']:.2f} ({summary['wall_s']:.0f}s)")
    return summary
