"""Supervised fine-tuning of the reference: the base learns the records' language first.

DPO moves a policy away from its reference by a reward; a random network as the reference
writes noise, and so does every policy built on it. The default tiny model, built from
scratch, is therefore trained as a language model on the records' own prompts and responses
before any DPO (`model.tiny.sft_epochs`); a named model can be too (`model.sft_epochs`,
default 0). Loss: mean next-token NLL of the response tokens (end-of-text included) given the
prompt, on every response (`model.sft_on: all`) or on each record's top-ranked one (`top`).

The training runs on the resident worker group (train/workers.py), data parallel: each step's
batch is drawn from all records, as one process would draw it, and every rank trains on the
rows in its own shard; summed gradients over the global token count are exactly the one-process
gradient, so the ranks stay identical and the result does not depend on the number of
workers. Rank 0 streams progress and returns the weights; the driver writes `base_model/`
atomically, so a crash during SFT leaves nothing and the same command redoes it. The workers
keep the trained model as their base: no second load.
"""

from __future__ import annotations

import math
import time

import numpy as np

from emdpo_ray.config import Config, ModelConfig


TINY_LR, NAMED_LR = 5e-3, 2e-5  # the defaults of model.sft_learning_rate (tiny: at width 48)


def default_sft_rate(mc: ModelConfig) -> float:
    """model.sft_learning_rate where unset: 2e-5 for a named model; for the tiny model 5e-3
    at its default width of 48, scaled as 1/width. At 5e-3 a tiny model of width 96 loses
    which words its states read and the start on them is blind (ARI 0.00 on five `order`
    seeds); at 2.5e-3 it starts as well as the default width
    (docs/start_features-order-backbones.md)."""
    if mc.name_or_path:
        return NAMED_LR
    width = type(mc.tiny).model_fields["hidden_size"].default  # the width TINY_LR is for
    return TINY_LR * width / mc.tiny.hidden_size


def sft_rows(resp_mask: np.ndarray, on: str) -> np.ndarray:
    """(record, response) pairs to train on: every real response, or the top-ranked one
    (responses are stored best first)."""
    if on == "top":
        return np.stack([np.arange(len(resp_mask)), np.zeros(len(resp_mask), int)], 1)
    rec, j = np.nonzero(resp_mask)
    return np.stack([rec, j], 1)


def sft_steps(num_rows: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * num_rows / batch_size))


def sft_batches(num_rows: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] indices into the rows: shuffled epochs, back to back."""
    rng = np.random.default_rng(seed)
    epochs = math.ceil(steps * batch_size / num_rows) + 1
    order = np.concatenate([rng.permutation(num_rows) for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size)


def rank_plans(rows: np.ndarray, batches: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Per rank, [n, 3] (step, record within the rank's shard, response) of every batch row
    whose record lies in that shard (shards are contiguous, of `sizes`), by step."""
    bounds = np.cumsum([0, *sizes])
    step = np.repeat(np.arange(len(batches)), batches.shape[1])
    rec, j = rows[batches.reshape(-1)].T
    rank = np.searchsorted(bounds, rec, side="right") - 1
    return [np.stack([step[rank == r], rec[rank == r] - bounds[r], j[rank == r]], 1)
            for r in range(len(sizes))]


def train_sft(model, arrays: dict, plan: np.ndarray, steps: int, lr: float,
              max_grad_norm: float, device, seed: int, report=None) -> list[float]:
    """One rank's part of data-parallel SFT (a process group is up). Loss: the batch's summed
    response-token NLL over its global token count; gradients and loss are summed over the
    ranks, so every rank takes the same step. `report(step, loss)` after each step."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cuts = np.searchsorted(plan[:, 0], np.arange(steps + 1))
    losses = []
    for step in range(steps):
        _, rec, j = plan[cuts[step]:cuts[step + 1]].T
        lm = torch.as_tensor(arrays["loss_mask"][rec, j, 1:], dtype=torch.float32, device=device)
        count = lm.sum().reshape(1)
        dist.all_reduce(count)
        nll_sum = torch.zeros((), device=device)
        opt.zero_grad()
        if len(rec):
            att = arrays["attention_mask"][rec, j]
            t = int(att.sum(-1).max())
            ids = torch.as_tensor(arrays["input_ids"][rec, j, :t], dtype=torch.long, device=device)
            logits = model(input_ids=ids, attention_mask=torch.as_tensor(att[:, :t], device=device)
                           ).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                    reduction="none")
            nll_sum = (nll * lm[:, :t - 1]).sum()
            (nll_sum / count.clamp_min(1)).backward()
        # one collective for every gradient and the loss (a rank with no row adds zeros)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params] + [(nll_sum.detach() / count.clamp_min(1)).reshape(1)])
        dist.all_reduce(flat)
        off = 0
        for p in params:
            p.grad = flat[off:off + p.numel()].view_as(p).to(p.dtype)
            off += p.numel()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(float(flat[-1]))
        if report is not None:
            report(step + 1, losses[-1])
    model.eval()
    return losses


def sft_plans(cfg: Config, resp_mask: np.ndarray, sizes: list[int],
              epochs: float) -> tuple[list[np.ndarray], int, float]:
    """The ranks' plans (rank_plans), the step count and the learning rate of `epochs`
    passes of SFT on the records of `resp_mask` in shards of `sizes`."""
    mc = cfg.model
    rows = sft_rows(resp_mask, mc.sft_on)
    steps = sft_steps(len(rows), mc.sft_batch_size, epochs)
    lr = mc.sft_learning_rate or default_sft_rate(mc)
    return rank_plans(rows, sft_batches(len(rows), mc.sft_batch_size, steps, cfg.seed),
                      sizes), steps, lr


def run_sft(cfg: Config, group, src: str, out_dir: str, resp_mask: np.ndarray, sizes: list[int],
            epochs: float, say=lambda m: None, progress=None, before_save=lambda: None) -> dict:
    """Fine-tune the model at `src` on the group's shards (data/encode.py layout; `resp_mask`
    [N, m] of all records, `sizes` the shards') and save it with its tokenizer to `out_dir`,
    atomically. Returns a summary (also `emdpo_sft.json` there). `progress(done, total,
    loss)` is called as steps finish."""
    import os
    import shutil

    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.utils import atomic_write_json

    mc = cfg.model
    plans, steps, lr = sft_plans(cfg, resp_mask, sizes, epochs)
    rows = sft_rows(resp_mask, mc.sft_on)
    t0 = time.perf_counter()
    out = group.sft(src, plans, steps, lr, cfg.seed,
                    (lambda done, loss: progress(done, steps, loss)) if progress else None)
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
               "workers": len(sizes), "losses": [float(x) for x in losses]}
    atomic_write_json(os.path.join(tmp, "emdpo_sft.json"), summary)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    on = f"{len(sizes)} worker{'s' if len(sizes) > 1 else ''}"
    say(f"SFT reference: {steps} steps on {len(rows)} responses ({mc.sft_on}) on {on}, loss "
        f"{summary['loss_first']:.2f} -> {summary['loss_last']:.2f} ({summary['wall_s']:.0f}s)")
    return summary
