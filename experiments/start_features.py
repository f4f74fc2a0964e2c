"""`make start-features`: what the start's features can carry, per family, and where the
unsupervised start loses it. On the data and SFT references of `make starts` (built here
when missing).

    .venv/bin/python experiments/start_features.py [--families linear,contextual,order]
        [--seeds 0,1] [--features NAME,...] [--out docs/start_features.json]

Per family and seed (runs/starts/<family>-<seed>.jsonl, its reference), for each feature set
of the start's linear Plackett-Luce mixture (train/start.py): the reference's states pooled
over the beginning, middle and end of each response from its middle layer (`reference`, the
default), from its last layer (the default before), from its token embeddings, and from its
middle layer pooled over 8 parts (`reference 8 parts`, finer positions); token counts
(`tokens`), the counts crossed with the prompt (`tokens by prompt`, the start's
`tokens_by_prompt`: the counts times the prompt's coordinates on the directions of its
words along which users' preferences co-vary) and token counts in each third of the
response (`tokens by position`, the cheap
analogue of the pooled states); and
the generator's own features (`generator`: the style counts the true reward is linear in, of
the first sentence for `order`, of the response otherwise, for `contextual` per context; the
exact model class, a bound, not a start). ARI against the true types:

- `start`: the start on those features (k-means, then 8 restarts, 20 iterations) at the L2
  penalty 1e-2, then walked down to 1e-3 and 1e-4 (train/start.py's l2_path), and as the
  default start ends (`chosen L2`): the L2 whose start, fitted on 80% of each user's
  rankings, best predicts the rest (or the strongest within noise of it), continued on all
  of them or the restarts walked down to it, whichever is likelier;
- `labels, fitted once`: the mixture fitted to the true labels at L2 1e-2, users then
  assigned by it; in-sample, each user's own rankings helped fit the weights that assign them, which
  flatters wide features;
- `labels, cross-fitted`: the same at the chosen L2, out of sample: users in five folds,
  each fold assigned by a mixture fitted to the true labels of the other four (what the
  features can carry when the types are known: a ceiling for any start on them);
- `labels, after EM`: the same mixture run 20 EM iterations from there (whether the true
  split is a fixed point the start could converge to, or EM drifts away from it).

`oracle`: users assigned by the true rewards and shares. Writes docs/start_features.{json,md}.

Variants (`--features`, VARIANTS): the reference's states or the positional counts projected
on the users' preference subspace (8 dimensions), and the two side by side;
docs/start_features-order-variants.{json,md} (`--families order --features "reference in
users' subspace,tokens by position in users' subspace,reference + tokens by position" --out
docs/start_features-order-variants.json`). Two more, from the language model itself:
`policies' states`, the same pooled states from each of the K policies the default run of
`make starts` trained on this data (runs/starts/<family>-auto-<seed>, on the types that run
ended with), side by side: does a policy trained on a partly right split represent what the
reference does not?; `reference output gradients`, the gradient of each response's
log-likelihood with respect to the reference's output layer, projected to 192 dimensions (a
first-order model of what a DPO step can change);
docs/start_features-order-policies.{json,md} (`--families order --features "policies'
states,reference output gradients" --out docs/start_features-order-policies.json`).
`reference trained further`: the states of a copy of the reference given more passes of SFT
on the responses, as the default start's (`em.init_sft_epochs`; `--further 1,2,4`: one set
per number of passes); with `--l2s` (the start's L2 path, from the strongest),
docs/start_features-order-levers.{json,md} (`--families order --features
"reference,reference trained further" --further 1,2,4 --l2s 1,0.1,1e-2,1e-3,1e-4 --out
docs/start_features-order-levers.json`); on three more seeds of `order`, at the default two
passes, docs/start_features-order-seeds.{json,md} (`--families order --seeds 2,3,4
--features "reference trained further" --out docs/start_features-order-seeds.json`).
`--reference NAME`: the states of another model (only the data of `make starts` needed), e.g.
SmolLM2-135M-Instruct as published, docs/start_features-order-smollm2.{json,md}
(`--families order --features reference --reference smollm2-135m-instruct --out
docs/start_features-order-smollm2.json`, about 50 minutes). `contextual` on generator v2
data, the start's candidates beside the bound: docs/start_features-contextual.{json,md}
(`--families contextual --features "reference,reference trained further,tokens,tokens by
prompt,generator" --out docs/start_features-contextual.json`). `tokens by prompt state`: the
start's `tokens_by_prompt_state` (the counts crossed with the directions of the
further-trained copy's whitened last-layer state of the prompt along which users'
preferences co-vary), beside it the same from the reference's own states and from the
copy's states standardised per coordinate but not whitened: what the language model's
reading of the prompt and the whitening each add, on `lead_topic`, whose context (which
topic comes first) the prompt's words as a bag cannot see;
docs/start_features-lead-topic.{json,md} (`--families lead_topic --features "tokens by
prompt,tokens by prompt state,tokens by prompt state (reference's own),tokens by prompt
state (not whitened),generator" --out docs/start_features-lead-topic.json`); on `order`, the
copy's response states whitened, docs/start_features-order-whitened.{json,md} (`--families
order --features "reference trained further,reference trained further whitened" --out
docs/start_features-order-whitened.json`). Two reductions of the copy's states to a few
dimensions, `reference trained further signal R` (the R directions in which users' mean
preferences differ most against their own rankings' noise) and `reference trained further
within R` (the top R directions in which a record's responses differ),
docs/start_features-order-reductions.{json,md}. Ensembles of the copy, `reference trained
further 3 copies averaged` and `... side by side` (two more copies, their passes on other
seeds), docs/start_features-order-copies.{json,md} (`--families order --seeds 0,1,2,3,4
--features "reference trained further,reference trained further 3 copies
averaged,reference trained further 3 copies side by side" --out
docs/start_features-order-copies.json`). The copy's states pooled by sentence, `reference trained
further by sentence`, beside the same by thirds of the tokens,
docs/start_features-order-sentences.{json,md} (`--families order --seeds 0,1,2,3,4 --features
"reference trained further,reference trained further by sentence" --out
docs/start_features-order-sentences.json`, 10 minutes here). The copy's last layer and both
layers averaged, and a copy trained further on the top-ranked responses only,
docs/start_features-order-layers.{json,md} (`--families order --seeds 2,0,1,3,4 --features
"reference trained further by sentence,reference trained further by sentence last
layer,reference trained further by sentence layers averaged,reference trained further on
top-ranked by sentence" --out docs/start_features-order-layers.json`). The copy's states by
sentence scaled (or whitened) within records, docs/start_features-order-within-records.{json,md}
(`--families order --seeds 0,1,2,3,4 --features "reference trained further by
sentence,reference trained further by sentence within records,reference trained further by
sentence whitened within records" --out docs/start_features-order-within-records.json`, 6
minutes here). Every set also gets
its `reward R^2` (each type's true reward between a record's responses, predicted out of
fold by a ridge regression on the set): on `order` seeds 0 to 9 the copy's states against
the generator's own features, docs/start_features-order-r2.{json,md} (`--families order
--seeds 0,1,2,3,4,5,6,7,8,9 --features "reference trained further by sentence,generator"
--out docs/start_features-order-r2.json`, 6 minutes here); SmolLM2-135M's own states by
sentence, reduced to 48 or 144 directions (`reference by sentence within R`),
docs/start_features-order-smollm2-reduced.{json,md} (`--families order --seeds 2,5
--reference smollm2-135m-instruct --features "reference by sentence within 48,reference by
sentence within 144" --out docs/start_features-order-smollm2-reduced.json`, 39 minutes
here). Other tiny backbones (`--tiny`, `--sft-lr`: width 96 at three SFT rates, 4 layers)
beside the default's states and the first sentence's word shares (the bound of a pooling
whose states kept every word), on `order` seeds 0 to 9, one run per backbone and seeds,
put side by side by `--merge` in docs/start_features-order-backbones.{json,md} (the
commands there; about 40 minutes here in all). The copy's states crossed with the prompt's
state (`reference by prompt state`, no counts) on `contextual`, at the L2 path of the
`language` start, docs/start_features-contextual-language.{json,md} (`--families contextual
--seeds 0,1,2 --features "reference by prompt state" --l2s 1,0.1,1e-2,1e-3,1e-4 --out
docs/start_features-contextual-language.json`, 6 minutes here). Data and references that
`make starts` has not made are built here first (the same data; the reference's SFT in
this process).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ["reference", "reference last layer", "reference embeddings", "reference 8 parts",
            "tokens", "tokens by prompt", "tokens by position", "generator"]
# Further variants (`--features`): the users' preference subspace (the features projected on
# the top 8 principal directions of the per-user preference embeddings, where users differ),
# the reference's states beside the positional counts, and the language model's own: the
# trained policies' states and the reference's output-layer gradients.
# the dimensions of the two reductions of the copy's states (signal_projected, within_projected)
SIGNAL_DIMS, WITHIN_DIMS, WIDE_DIMS = (3, 6, 16), (8, 16, 32, 64), (48, 144)
COPIES = 3  # copies of the further-trained reference in the ensembles, each on its own seed
VARIANTS = ["reference in users' subspace", "tokens by position in users' subspace",
            "reference + tokens by position", "policies' states", "reference output gradients",
            "reference trained further", "reference trained further by sentence",
            "reference by prompt state",
            "reference trained further by sentence + embeddings",
            "reference trained further by sentence summed",
            "reference trained further by sentence within records",
            "reference trained further by sentence whitened within records",
            "reference trained further by sentence last layer",
            "reference trained further by sentence layers averaged",
            "reference trained further on top-ranked by sentence",
            "tokens by prompt state",
            "tokens by prompt state (reference's own)", "tokens by prompt state (not whitened)",
            "reference trained further whitened"] + [
            f"reference trained further signal {r}" for r in SIGNAL_DIMS] + [
            f"reference trained further within {r}" for r in WITHIN_DIMS] + [
            "reference by sentence"] + [f"reference by sentence within {r}" for r in WIDE_DIMS] + [
            f"reference trained further {COPIES} copies averaged",
            f"reference trained further {COPIES} copies side by side",
            "first sentence's word shares"]


def preference_subspace(x, mask, user_index, num_users, dims: int = 8):
    """x projected on the top `dims` principal directions of the users' preference
    embeddings (train/start.py), standardised: a low-dimensional start where users differ."""
    from emdpo_ray.train import linear_mixture as lm, start as st

    emb = lm.preference_embeddings(x, mask, user_index, num_users)
    _, _, vt = np.linalg.svd(emb - emb.mean(0), full_matrices=False)
    return st.standardized((x @ vt[:dims].T).astype(np.float32), mask)


def between_within(d: np.ndarray, user_index: np.ndarray, num_users: int):
    """(B, W) of the records' preference vectors d [N, F]: B = sum over users of mu_u mu_u^T,
    each user's mean preference estimated from pairs of distinct records (each record's
    product with itself left out, so B holds no ranking noise in expectation); W the
    within-user covariance of d (the ranking noise)."""
    n_u = np.bincount(user_index, minlength=num_users).astype(float)
    s = np.zeros((num_users, d.shape[1]))
    np.add.at(s, user_index, d)
    pairs = n_u * (n_u - 1)
    ok = pairs > 0
    per_record = np.where(ok, 1 / np.where(ok, pairs, 1), 0)[user_index]
    b = (s[ok] / pairs[ok, None]).T @ s[ok] - (d * per_record[:, None]).T @ d
    r = d - (s / np.maximum(n_u, 1)[:, None])[user_index]
    return b, r.T @ r / max(len(d) - num_users, 1)


def signal_projected(x, mask, user_index, num_users, r: int, ridge: float = 1e-3):
    """x projected on the top r generalised eigenvectors of (B, W) (between_within of the
    rank-weighted features), standardised: the directions in which users differ most
    against their own rankings' noise."""
    from scipy.linalg import eigh

    from emdpo_ray.train import linear_mixture as lm, start as st

    b, w = between_within(lm.rank_weighted(x, mask), user_index, num_users)
    values, vectors = eigh(b, w + ridge * np.trace(w) / len(w) * np.eye(len(w)))
    print("signal eigenvalues", np.round(np.sort(values)[::-1][:12], 1), flush=True)
    return st.standardized((x @ vectors[:, np.argsort(-values)[:r]]).astype(np.float32), mask)


def within_projected(x, mask, r: int) -> np.ndarray:
    """x projected on the top r principal directions of the responses' deviations from
    their record's mean (the directions in which a record's responses differ), standardised."""
    from emdpo_ray.report.evaluate import record_centred
    from emdpo_ray.train import start as st

    _, _, vt = np.linalg.svd(record_centred(x, mask)[mask], full_matrices=False)
    return st.standardized((x @ vt[:r].T).astype(np.float32), mask)


def positional_counts(records, parts: int = 3) -> np.ndarray:
    """[N, m, parts * V] token counts of each ranked response in `parts` equal parts of its
    tokens (beginning, middle, end): the cheap analogue of the reference's pooled states."""
    from sklearn.feature_extraction.text import CountVectorizer

    from emdpo_ray.train.context_features import TOKEN_PATTERN

    tokens = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True).build_analyzer()
    vocab = {t: i for i, t in enumerate(sorted({t for r in records for y in r.responses
                                                 for t in tokens(y)}))}
    m = max(len(r.responses) for r in records)
    x = np.zeros((len(records), m, parts * len(vocab)), np.float32)
    for i, r in enumerate(records):
        for j, y in enumerate(r.ranked):
            toks = tokens(y)
            for p, t in enumerate(toks):
                x[i, j, min(parts - 1, p * parts // len(toks)) * len(vocab) + vocab[t]] += 1
    return x


def output_gradients(model, arrays: dict, dims: int = 192, seed: int = 0) -> np.ndarray:
    """[n, m, dims] per response: the gradient of its mean token log-likelihood with respect
    to the output layer's weights, sum_t (onehot(y_t) - p_t) h_t^T, under a fixed Gaussian
    projection."""
    import torch

    from emdpo_ray.models.bank import REFERENCE
    from emdpo_ray.models.features import projection
    from emdpo_ray.models.scoring import flat_rows

    n, m = arrays["resp_mask"].shape
    per = max(1, 128 // m)     # records per batch: [rows, T, vocab] residuals stay small
    out = np.zeros((n, m, dims), np.float32)
    proj = None
    with torch.no_grad():
        for s in range(0, n, per):
            idx = np.arange(s, min(n, s + per))
            rows = flat_rows(arrays, np.stack([idx, np.full(len(idx), REFERENCE)], 1), "cpu")
            o = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                      output_hidden_states=True)
            # state t predicts token t + 1: the loss mask marks those states (features.py)
            nxt = torch.roll(rows["input_ids"], -1, 1)
            lm = rows["loss_mask"].float()
            resid = (torch.nn.functional.one_hot(nxt, o.logits.shape[-1]).float()
                     - o.logits.float().softmax(-1)) * lm[..., None]
            g = torch.einsum("btv,bth->bvh", resid, o.hidden_states[-1].float())
            g = (g.reshape(len(g), -1) / lm.sum(1, keepdim=True).clamp_min(1)).numpy()
            proj = projection(g.shape[1], dims, seed) if proj is None else proj
            p_idx, j_idx = (t.numpy() for t in rows["scatter"])
            out[idx[p_idx], j_idx] = g @ proj
    return out


def whitened_states(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, m, D'] the real responses' features whitened together (train/start.py's
    whitened), padding 0: every direction of the states at the same scale before the
    mixture's L2 penalty."""
    from emdpo_ray.train.context_features import whitened

    w = whitened(x[mask])
    out = np.zeros((*x.shape[:2], w.shape[1]), np.float32)
    out[mask] = w
    return out


def within_record_scaled(x: np.ndarray, mask: np.ndarray, whiten: bool = False) -> np.ndarray:
    """[N, m, D'] each record's responses' features less their record mean, each coordinate
    (or, `whiten`, every direction) scaled by its spread *within* records: a ranking's
    likelihood reads only differences between a record's responses, so the L2 penalty is
    set by those, not by what varies from record to record (its topic, its sentences)."""
    n = mask.sum(1, keepdims=True)[..., None]
    d = np.where(mask[..., None], x - (x * mask[..., None]).sum(1, keepdims=True) / n, 0)
    if whiten:
        return whitened_states(d, mask)
    return (d / (d[mask].std(0) + 1e-6)).astype(np.float32)


def trained_further(model, arrays: dict, epochs: float, seed: int, on: str = "all",
                    lr: float | None = None):
    """A copy of `model` given `epochs` more passes of SFT on the responses (`on`: every
    response, or each record's top-ranked one, model.sft_on) at the default tiny model's rate
    (or `lr`: another width's, train/sft.py default_sft_rate), as the default start's copy
    (em.init_sft_epochs; train/sft.py), in one process."""
    import copy

    import torch
    import torch.distributed as dist

    from emdpo_ray.config import load_config
    from emdpo_ray.train.sft import TINY_LR, sft_plans, train_sft
    from emdpo_ray.utils import free_port

    if not dist.is_initialized():  # train_sft sums over ranks: a group of one
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    cfg = load_config(None, [f"seed={seed}", f"model.sft_on={on}"])
    plans, steps, _ = sft_plans(cfg, arrays["resp_mask"], [len(arrays["resp_mask"])], epochs)
    out = copy.deepcopy(model).float()
    train_sft(out, arrays, plans[0], steps, lr or TINY_LR, cfg.dpo.max_grad_norm,
              torch.device("cpu"), seed)
    return out.eval()


def prepare(data: str, ref: str, family: str, seed: int, tiny: tuple[str, ...] = (),
            lr: float | None = None) -> None:
    """`make starts`' data and tiny SFT reference for one family and seed, built here in one
    process when that run has not made them (the same data; SFT on one rank, not the run's
    workers). `tiny`: overrides of model.tiny (another width or depth), SFT at `lr`."""
    import shutil

    from emdpo_ray.config import load_config
    from emdpo_ray.data import synth
    from emdpo_ray.data.encode import encode
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.models.tiny import build_tiny_model
    from starts import SHARES

    if not os.path.exists(data):
        synth.write(data, *synth.generate(users=300, types=3, rankings_per_user=10,
                                          responses=3, shares=SHARES, seed=seed, family=family))
    cfg = load_config(None, [f"seed={seed}", *(f"model.tiny.{o}" for o in tiny)])
    records = load_records(data)
    init = build_tiny_model([t for r in records for t in (r.prompt, *r.responses)],
                            ref + ".init", cfg.model, seed)
    tok = load_tokenizer(init, cfg.model)
    model = trained_further(load_base(init, cfg.model), encode(records, tok, cfg.data).arrays(),
                            cfg.model.sft_passes, seed, lr=lr)
    model.save_pretrained(ref + ".partial", safe_serialization=True)
    tok.save_pretrained(ref + ".partial")
    os.replace(ref + ".partial", ref)
    shutil.rmtree(init)
    print(f"prepared {data} and its SFT reference", flush=True)


def policy_states(run: str, arrays: dict) -> np.ndarray:
    """[n, m, K * D] the middle-layer pooled states (features.py) of each policy of a run,
    side by side."""
    from emdpo_ray.models.bank import load_policy_bank
    from emdpo_ray.models.features import response_representations
    from emdpo_ray.run.rundir import RunDir

    import torch

    rd = RunDir(run).require_finished()
    cfg = rd.config()
    _, bank = load_policy_bank(rd.base_path(cfg), cfg.model, rd.policy_dirs())
    out = []
    for name in bank.names:
        bank.model.set_adapter(name)
        out.append(response_representations(bank.model, arrays, torch.device("cpu"),
                                            dims=1 << 16))
    return np.concatenate(out, -1)


def generator_features(records, meta: dict) -> np.ndarray:
    """[N, m, F] the synthetic generator's own features of each ranked response (for
    `contextual` and `lead_topic` one block per context, zero in the other)."""
    from emdpo_ray.data import synth

    fam = meta["family"]
    f = len(meta["features"])
    m = max(len(r.responses) for r in records)
    ctx = {"contextual": synth.context, "lead_topic": synth.lead_context}.get(fam)
    x = np.zeros((len(records), m, 2 * f if ctx else f), np.float32)
    for i, r in enumerate(records):
        for j, y in enumerate(r.ranked):
            v = synth.text_features(synth.first_sentence(y) if fam == "order" else y)
            c = ctx(r.prompt) if ctx else 0
            x[i, j, c * f:(c + 1) * f] = v
    return x


def first_sentence_shares(records) -> np.ndarray:
    """[N, m, V] each response's first-sentence words as shares of its words: what a mean
    over the first sentence would hold if each state kept which word it reads (`order`'s
    true reward is linear in the counts, so this is near its exact model: a bound, not a
    start)."""
    from sklearn.feature_extraction.text import CountVectorizer

    from emdpo_ray.data.synth import first_sentence
    from emdpo_ray.train.context_features import TOKEN_PATTERN

    firsts = [first_sentence(y) for r in records for y in r.ranked]
    c = CountVectorizer(token_pattern=TOKEN_PATTERN).fit_transform(firsts).toarray()
    shares = c / np.maximum(c.sum(1, keepdims=True), 1)
    m = max(len(r.responses) for r in records)
    x, i = np.zeros((len(records), m, c.shape[1]), np.float32), 0
    for j, r in enumerate(records):
        x[j, :len(r.ranked)] = shares[i:i + len(r.ranked)]
        i += len(r.ranked)
    return x


def true_reward_array(records, meta: dict, m: int) -> np.ndarray:
    """[K, N, m] every type's true reward of each ranked response (0 where padded)."""
    from emdpo_ray.data import synth

    out = np.zeros((len(meta["shares"]), len(records), m))
    for i, r in enumerate(records):
        out[:, i, :len(r.ranked)] = synth.true_rewards(meta, [r.prompt] * len(r.ranked),
                                                       list(r.ranked))
    return out


def oracle_labels(records, user_index, num_users, meta: dict) -> np.ndarray:
    """Each user's MAP type under the true rewards and shares."""
    from emdpo_ray.core.estep import e_step
    from emdpo_ray.core.losses import plackett_luce_logp

    import torch

    m = max(len(r.ranked) for r in records)
    rew = true_reward_array(records, meta, m)                                # [K, N, m]
    k, n = rew.shape[:2]
    mask = torch.as_tensor(np.arange(m) < np.array([len(r.ranked) for r in records])[:, None])
    scores = plackett_luce_logp(torch.as_tensor(rew).reshape(k * n, m), mask.repeat(k, 1))
    return e_step(scores.numpy().reshape(k, n).T, user_index, num_users,
                  np.asarray(meta["shares"])).gamma.argmax(1)


def record_folds(user_index, num_users, folds: int = 5) -> np.ndarray:
    """[N] the fold of each record's user (users drawn into folds at random, seed 0)."""
    return np.random.default_rng(0).integers(0, folds, num_users)[user_index]


def crossfit_scores(x, mask, user_index, num_users, gamma, folds: int = 5,
                    l2: float = 1e-2) -> np.ndarray:
    """[N, K] each record's log-likelihood under a linear mixture fitted to the posteriors
    `gamma` of the users in the other folds (no user's rankings fit the weights that score
    it)."""
    from emdpo_ray.train import linear_mixture as lm

    fold = record_folds(user_index, num_users, folds)
    scores = np.zeros((len(x), gamma.shape[1]))
    for f in range(folds):
        fit = fold != f
        mix = lm.fit_linear_mixture(x[fit], mask[fit], user_index[fit], num_users, gamma, 0, l2)
        scores[~fit] = lm.record_logliks(x[~fit], mask[~fit], mix.theta)
    return scores


def crossfit_labels(x, mask, user_index, num_users, truth, k: int, folds: int = 5,
                    l2: float = 1e-2) -> np.ndarray:
    """Each user's MAP type under a linear mixture fitted to the true labels of the users in
    the other folds (out of sample: no user's rankings fit the weights that assign it)."""
    from emdpo_ray.core.estep import e_step, smoothed_onehot

    gamma = smoothed_onehot(truth, k, 0.05)
    scores = crossfit_scores(x, mask, user_index, num_users, gamma, folds, l2)
    return e_step(scores, user_index, num_users, gamma.mean(0)).gamma.argmax(1)


def one(family: str, seed: int, runs: str, features: list[str] = FEATURES,
        reference: str | None = None, l2s: tuple[float, ...] = (1e-2, 1e-3, 1e-4),
        further: tuple[float, ...] | None = None, tiny: tuple[str, ...] = (),
        sft_lr: float | None = None) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from emdpo_ray.config import load_config
    from emdpo_ray.core.estep import e_step, smoothed_onehot
    from emdpo_ray.data.encode import encode
    from emdpo_ray.data.sources import load_records
    from emdpo_ray.models.features import (reference_representations,
                                           response_representations, sentence_end_ids)
    from emdpo_ray.models.loading import load_base, load_tokenizer
    from emdpo_ray.report.evaluate import within_record_r2
    from emdpo_ray.train import context_features as cf, linear_mixture as lm, start as st

    import torch

    data, ref = os.path.join(runs, f"{family}-{seed}.jsonl"), os.path.join(runs, f"{family}-{seed}-reference")
    if tiny or sft_lr:  # another tiny backbone: its own reference beside the default's
        ref += "-" + "-".join([*tiny, *([f"lr={sft_lr:g}"] if sft_lr else [])])
    if not (os.path.exists(data) and os.path.isdir(ref)):
        prepare(data, ref, family, seed, tiny, sft_lr)
    cfg = load_config(None, [])
    if reference is not None:  # another model's states, e.g. a pretrained one, not the SFT reference
        from emdpo_ray.models.sources import resolve_named_model

        ref = resolve_named_model(cfg.model.model_copy(update={"name_or_path": reference}))
    records = load_records(data)
    meta = json.load(open(data + ".meta.json"))
    tok, model = load_tokenizer(ref, cfg.model), load_base(ref, cfg.model).eval()
    enc = encode(records, tok, cfg.data)
    ui, num_users, mask = enc.user_index, len(enc.users), enc.resp_mask
    truth = np.zeros(num_users, int)
    truth[ui] = [r.true_type for r in records]
    k = len(meta["shares"])

    def ari(labels) -> float:
        return round(float(adjusted_rand_score(truth, labels)), 3)

    def states(layer: int | None | tuple, parts: int = 3, of=None, by_sentence: bool = False,
               summed: bool = False) -> np.ndarray:
        # dims above any width: every state kept, never projected (the 8 parts' 384 too);
        # a tuple of layers: their pooled states side by side
        return st.standardized(response_representations(
            of or model, enc.arrays(), torch.device("cpu"), segments=parts, dims=1 << 16,
            layers=layer if isinstance(layer, tuple) else (layer,),
            end_ids=sentence_end_ids(tok) if by_sentence else None, summed=summed), mask)

    makers = {"reference": lambda: states(None), "reference last layer": lambda: states(-1),
              "reference embeddings": lambda: states(0),
              "reference 8 parts": lambda: states(None, 8),
              "tokens": lambda: st.response_features(records)[0],
              "tokens by prompt": lambda: cf.tokens_by_prompt(
                  records, st.response_features(records)[0], mask, ui, num_users),
              "tokens by position": lambda: positional_counts(records),
              "generator": lambda: generator_features(records, meta),
              "first sentence's word shares": lambda: st.standardized(
                  first_sentence_shares(records), mask)}

    def positional() -> np.ndarray:
        return st.standardized(positional_counts(records), mask)

    @functools.cache
    def further_model():
        return trained_further(model, enc.arrays(), cfg.start_sft_passes, seed, lr=sft_lr)

    def by_prompt_state(of, whiten: bool = True) -> np.ndarray:
        # the start's tokens_by_prompt_state; unwhitened: each coordinate only standardised
        g = reference_representations(of, enc.arrays(), torch.device("cpu")).prompts
        if whiten:
            return cf.tokens_by_prompt_state(st.response_features(records)[0], mask, g, ui,
                                             num_users)
        return cf.crossed_with_prompt(cf.frequent_words(st.response_features(records)[0]), mask,
                                      (g - g.mean(0)) / (g.std(0) + 1e-6), cf.state_covariation,
                                      ui, num_users)

    def states_by_prompt_state() -> np.ndarray:   # the start's reference_by_prompt_state
        g = reference_representations(further_model(), enc.arrays(), torch.device("cpu")).prompts
        return cf.reference_by_prompt_state(
            states((None, 0), of=further_model(), by_sentence=True), mask, g, ui, num_users)

    makers.update({
        "tokens by prompt state": lambda: by_prompt_state(further_model()),
        "tokens by prompt state (reference's own)": lambda: by_prompt_state(model),
        "tokens by prompt state (not whitened)": lambda: by_prompt_state(further_model(), False),
        # no counts: the copy's response states (the default start's layers) crossed with
        # the prompt-state directions along which users' preferences co-vary
        "reference by prompt state": states_by_prompt_state,
        "reference in users' subspace": lambda: preference_subspace(
            states(None), mask, ui, num_users),
        "tokens by position in users' subspace": lambda: preference_subspace(
            positional(), mask, ui, num_users),
        "reference + tokens by position": lambda: np.concatenate([states(None), positional()], -1),
        "policies' states": lambda: st.standardized(policy_states(
            os.path.join(runs, f"{family}-auto-{seed}"), enc.arrays()), mask),
        "reference output gradients": lambda: st.standardized(
            output_gradients(model, enc.arrays()), mask),
        "reference trained further": lambda: states(None, of=further_model()),
        "reference trained further by sentence": lambda: states(None, of=further_model(),
                                                                by_sentence=True),
        "reference trained further by sentence within records": lambda: within_record_scaled(
            states(None, of=further_model(), by_sentence=True), mask),
        "reference trained further by sentence whitened within records": lambda:
            within_record_scaled(states(None, of=further_model(), by_sentence=True), mask, True),
        # the start's default since Dec 7 (em.init_layers): the middle layer and the token
        # embeddings, each pooled by sentence, side by side
        "reference trained further by sentence + embeddings": lambda: states(
            (None, 0), of=further_model(), by_sentence=True),
        "reference trained further by sentence summed": lambda: states(
            None, of=further_model(), by_sentence=True, summed=True),
        "reference trained further whitened": lambda: whitened_states(
            states(None, of=further_model()), mask),
        "reference trained further by sentence last layer": lambda: states(
            -1, of=further_model(), by_sentence=True),
        "reference trained further by sentence layers averaged": lambda: st.standardized(
            (states(None, of=further_model(), by_sentence=True)
             + states(-1, of=further_model(), by_sentence=True)) / 2, mask),
        # a third of the rows (one response a record): three passes, as many steps as one
        "reference trained further on top-ranked by sentence": lambda: states(
            None, of=trained_further(model, enc.arrays(), 3 * cfg.start_sft_passes, seed,
                                     "top", sft_lr),
            by_sentence=True)})

    @functools.cache
    def copies_states() -> list[np.ndarray]:
        # the default copy first, then copies whose SFT runs on other seeds (batch order)
        return [states(None, of=further_model())] + [
            states(None, of=trained_further(model, enc.arrays(), cfg.start_sft_passes,
                                            seed + 1000 * i, lr=sft_lr))
            for i in range(1, COPIES)]

    makers[f"reference trained further {COPIES} copies averaged"] = lambda: st.standardized(
        np.mean(copies_states(), 0), mask)
    makers[f"reference trained further {COPIES} copies side by side"] = lambda: np.concatenate(
        copies_states(), -1)
    for r in SIGNAL_DIMS:
        makers[f"reference trained further signal {r}"] = lambda r=r: signal_projected(
            states(None, of=further_model()), mask, ui, num_users, r)
    for r in WITHIN_DIMS:
        makers[f"reference trained further within {r}"] = lambda r=r: within_projected(
            states(None, of=further_model()), mask, r)
    # the reference's own states by sentence, whole or reduced (with --reference: a wider
    # published model's, whose 3 x 576 coordinates a mixture cannot fit from 300 users)
    makers["reference by sentence"] = lambda: states(None, by_sentence=True)
    for r in WIDE_DIMS:
        makers[f"reference by sentence within {r}"] = lambda r=r: within_projected(
            states(None, by_sentence=True), mask, r)
    # --further: one set per number of further passes, in place of the default's one
    for e in further or ():
        makers[f"reference + {e:g} SFT passes"] = (
            lambda e=e: states(None, of=trained_further(model, enc.arrays(), e, seed,
                                                        lr=sft_lr)))
    if further:
        features = [f for f in features if f != "reference trained further"] + [
            f"reference + {e:g} SFT passes" for e in further]
    held = st.heldout_records(ui, 0.2, seed)
    rewards = true_reward_array(records, meta, mask.shape[1])
    out = {"family": family, "seed": seed, "users": num_users, "l2s": list(l2s),
           "reference": reference or "SFT reference", "tiny": list(tiny), "sft_lr": sft_lr,
           "oracle": ari(oracle_labels(records, ui, num_users, meta)), "features": {}}
    for name in features:
        x = makers[name]()
        start = lm.feature_start(x, mask, ui, num_users, k, seed, 20, restarts=8, l2=l2s[0])
        path = lm.l2_path(x, mask, ui, num_users, start, list(l2s), 20)
        _, l2, _, g, _ = st.choose_features({name: lambda: x}, mask, ui, num_users, k, seed, 20,
                                            held, 8, l2s=l2s)
        # as the default start: the chosen start continued on every record, or the fresh
        # restarts walked down to the chosen L2, whichever is likelier
        final = max((lm.fit_linear_mixture(x, mask, ui, num_users, g, 20, l2),
                     path[list(l2s).index(l2)]),
                    key=lambda m: lm.mixture_loglik(x, mask, ui, num_users, m))
        labels = smoothed_onehot(truth, k, 0.05)
        once = lm.fit_linear_mixture(x, mask, ui, num_users, labels, 0)
        once_g = e_step(lm.record_logliks(x, mask, once.theta), ui, num_users, once.eta).gamma
        em = lm.fit_linear_mixture(x, mask, ui, num_users, labels, 20)
        out["features"][name] = {
            "dims": int(x.shape[-1]), "start": ari(start.gamma.argmax(1)),
            "start_l2_path": [ari(m.gamma.argmax(1)) for m in path],
            "chosen_l2": l2, "start_chosen_l2": ari(final.gamma.argmax(1)),
            "start_loglik": round(lm.mixture_loglik(x, mask, ui, num_users, start), 1),
            "labels_once": ari(once_g.argmax(1)),
            "labels_crossfit": ari(crossfit_labels(x, mask, ui, num_users, truth, k, l2=l2)),
            "labels_em": ari(em.gamma.argmax(1)),
            "labels_em_loglik": round(lm.mixture_loglik(x, mask, ui, num_users, em), 1),
            "reward_r2": [round(within_record_r2(x, mask, r), 3) for r in rewards]}
        print(family, seed, name, out["features"][name], flush=True)
    return out


HEADER = """# What the start's features carry

`make start-features` ([`experiments/start_features.py`](../experiments/start_features.py),
figures in [`{json}`]({json})), on the data and SFT references of
`make starts` (300 users, 10 rankings of 3, shares 0.5/0.3/0.2). Feature sets: the
reference's states pooled over the beginning, middle and end of each response from its middle
layer (`reference`, the default), its last layer and its token embeddings, and from its middle
layer over 8 parts; token counts, token counts crossed with the prompt (`tokens by prompt`,
the start's `tokens_by_prompt`), and token counts in each third of the response (`tokens by
position`). ARI of the linear Plackett-Luce mixture of the start on each feature set: the
start at L2 1e-2 (`start`), walked down to 1e-3 and 1e-4, and at the L2 whose fit without a
fifth of each user's rankings best predicts them, or the strongest within noise of it
(`chosen L2`, as the default start chooses); the mixture fitted once to the true labels at
L2 1e-2 and users assigned by it (`labels, once`: in-sample, each user's rankings help fit
the weights that assign it); the same out of sample (`labels, cross-fitted`, at the chosen L2: five folds
of users, each assigned by the mixture fitted to the other four's true labels; what the
features carry when the types are known, a ceiling for any start on them); and 20 EM
iterations from the labels (`labels, EM`). `generator` is the generator's own features, the
exact model class of the true rewards: a bound, not a start. `oracle`: users assigned by the
true rewards. `reward R^2`: per true type, the share of its reward's variance between a
record's responses that a ridge regression on the features predicts, five folds of records
(report/evaluate.py's within_record_r2; how much of each type's reward a linear reward on
the features can carry; `-` where a run predates it).

"""


VARIANTS_NOTE = """Variants here (`--features`): `reference in users' subspace` and `tokens by position in
users' subspace`, the reference's states and the positional counts (each standardised)
projected on the top 8 principal directions of the users' preference embeddings (where
users differ); `reference + tokens by position`, the two side by side; `policies' states`,
the same pooled states from each of the K policies that the default run of `make starts`
trained on this data (on the types that run ended with), side by side; `reference output gradients`, the
gradient of each response's log-likelihood with respect to the reference's output layer,
projected to 192 dimensions; `reference + N SFT passes`, the states of a copy of the
reference given N more passes of SFT on the responses (`em.init_sft_epochs`, 1 by default;
2 before).
`tokens by prompt state`, the start's `tokens_by_prompt_state` (token counts crossed with
the directions of the further-trained copy's whitened last-layer state of the prompt along
which users' preferences co-vary); `(reference's own)`, the same from the reference's own
states; `(not whitened)`, the copy's states standardised per coordinate, not whitened.
`reference trained further whitened`: the copy's response states whitened over all
responses (every direction at one scale under the L2 penalty) in place of standardised per
coordinate. `reference trained further signal R`: the copy's states projected on the R
directions in which users' mean preferences differ most against the noise of their own
rankings (generalised eigenvectors of the between-user second moment, each record's product
with itself left out, and the within-user covariance); `reference trained further within R`:
projected on the top R principal directions in which a record's responses differ from each
other. `reference trained further 3 copies averaged` and `side by side`: three copies, each
given the further passes on its own seed (the order of its batches), their standardised
states averaged per coordinate (the copies share the reference's coordinates) or put side by
side: does the seed's noise in one copy limit what the states carry?
`reference trained further by sentence`: the copy's states pooled over each response's first
sentence, its middle sentences and its last (the start's pooling, em.init_pooling
`sentences`, since docs/start_features-order-sentences.md; every other set here pools by
thirds of the tokens, the start's former pooling). `reference trained further by sentence
summed`: the same sums of states over each part instead of means, as a DPO reward sums over
a response's tokens (a part's sum grows with its length, its mean does not). `... by sentence
last layer`: the copy's last layer's states pooled by sentence in place of its middle
layer's; `... by sentence layers averaged`: the two layers' standardised states averaged.
`... by sentence + embeddings`: the copy's middle-layer states and its token embeddings, each
pooled by sentence, side by side (the start's default since Dec 7, em.init_layers).
`... by sentence within records`: the same states less their record's mean, each coordinate
scaled by its spread between a record's responses (a ranking reads only those differences,
so the L2 penalty is set by them, not by what varies between records); `... whitened within
records`: those differences whitened (every direction at one scale).
`reference trained further on top-ranked by sentence`: a copy given its further SFT on each
record's top-ranked response only (model.sft_on `top`; three passes over those, as many
steps as the default's one pass over every response): text the population prefers, so the
copy learns what preferred openings look like.
`reference by sentence`: the reference's own states (with `--reference`, that model's)
pooled by sentence; `... within R`: projected on the top R directions in which a record's
responses differ, as `within R` above.
`first sentence's word shares`: each response's first-sentence words as shares of its
words, what a mean over the first sentence would hold if every state kept which word it
reads (near `order`'s exact model, as `generator`: a bound for the pooling, not a start).
A feature set named with settings in brackets is on another tiny backbone (`--tiny`,
`--sft-lr`): its own SFT reference, built with those `model.tiny` settings and SFT learning
rate, and its copy trained further at that rate.
`reference by prompt state`: the start's `reference_by_prompt_state`, the copy's states by
sentence with its token embeddings (the default `reference`) crossed with the directions of
its whitened state of the prompt along which users' preferences co-vary: no counts on
either side.

"""


def table(results: list[dict]) -> str:
    path = ", ".join(f"{a:g}" for a in results[0].get("l2s", [1e-2, 1e-3, 1e-4])[1:])
    rows = [f"| family | seed | oracle | features | dims | start | L2 {path} | chosen L2 | "
            "labels, once | labels, cross-fitted | labels, EM | log-lik: start vs labels-EM | "
            "reward R^2, by type |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for name, f in r["features"].items():
            rows.append(f"| {r['family']} | {r['seed']} | {r['oracle']:.2f} | {name} | {f['dims']} "
                        f"| {f['start']:.2f} | {', '.join(f'{a:.2f}' for a in f['start_l2_path'][1:])} "
                        f"| {f['chosen_l2']:g}: {f['start_chosen_l2']:.2f} "
                        f"| {f['labels_once']:.2f} | {f['labels_crossfit']:.2f} | {f['labels_em']:.2f} | "
                        f"{f['start_loglik']:.0f} vs {f['labels_em_loglik']:.0f} | "
                        + (", ".join(f"{v:.2f}" for v in f["reward_r2"]) if "reward_r2" in f
                           else "-") + " |")
    return "\n".join(rows)


def paired_over_seeds(results: list[dict]) -> str:
    """Per family and feature set with more than one seed: the mean start (chosen L2) and
    labels cross-fitted, and each minus the first feature set's on the same seeds (95%
    t-intervals over seeds)."""
    from emdpo_ray.report.seeds import t_interval

    def fmt(v: list[float]) -> str:
        return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"

    rows = []
    for family in dict.fromkeys(r["family"] for r in results):
        runs = [r for r in results if r["family"] == family]
        names = list(runs[0]["features"])
        if len(runs) < 2 or len({n for r in runs for n in r["features"]}) < 2:
            continue
        for name in dict.fromkeys(n for r in runs for n in r["features"]):
            have = [r for r in runs if name in r["features"] and names[0] in r["features"]]
            if len(have) < 2:  # merged runs: a set on one seed only
                continue
            cols = []
            for key in ("start_chosen_l2", "labels_crossfit"):
                v = [r["features"][name][key] for r in have]
                d = [a - r["features"][names[0]][key] for a, r in zip(v, have)]
                cols += [f"{t_interval(v)[0]:.3f}", fmt(t_interval(d))]
            at_bar = sum(r["features"][name]["start_chosen_l2"] >= 0.8 for r in have)
            r2 = [np.mean(r["features"][name].get("reward_r2") or np.nan) for r in have]
            cols += [f"{at_bar} of {len(have)}", "-" if np.isnan(r2).any() else f"{np.mean(r2):.3f}"]
            rows.append(f"| {family} | {name} | {len(have)} | " + " | ".join(cols) + " |")
    if not rows:
        return ""
    return ("\n\nOver seeds, each feature set against the first on the same seeds (mean, "
            "paired difference [95% t-interval]):\n\n"
            "| family | features | seeds | start, chosen L2 | minus the first | labels, "
            "cross-fitted | minus the first | start at 0.8 or more | reward R^2, mean |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(rows))


def merged(paths: list[str]) -> list[dict]:
    """The results of several runs (e.g. one per backbone) as one: per family and seed, every
    run's feature sets side by side, each named with its run's backbone where it has one."""
    out: dict = {}
    for path in paths:
        for r in json.load(open(path)):
            tag = ", ".join([*r.get("tiny", []), *([f"lr {r['sft_lr']:g}"] if r.get("sft_lr")
                                                   else [])])
            row = out.setdefault((r["family"], r["seed"]), {  # each run's own keys dropped
                **{k: v for k, v in r.items() if k not in ("tiny", "sft_lr", "command")},
                "features": {}})
            for name, f in r["features"].items():
                row["features"][f"{name} [{tag}]" if tag else name] = f
    return list(out.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--families", default="linear,contextual,order")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "start_features.json"))
    p.add_argument("--reference", default=None,
                   help="the states of this model (a name such as smollm2-135m-instruct, an id "
                        "or a folder) instead of each run's SFT reference")
    p.add_argument("--l2s", default="1e-2,1e-3,1e-4",
                   help="L2 penalties of the start, walked from the strongest down")
    p.add_argument("--further", default=None,
                   help="with the `reference trained further` set: its numbers of further SFT "
                        "passes, one set each (default: em.init_sft_epochs' default)")
    p.add_argument("--tiny", default="",
                   help="another tiny backbone: model.tiny overrides, comma-separated (e.g. "
                        "hidden_size=96,intermediate_size=192); its own SFT reference")
    p.add_argument("--sft-lr", type=float, default=None,
                   help="the tiny reference's and its copies' SFT learning rate (default: "
                        "the tiny model's at its width, train/sft.py default_sft_rate)")
    p.add_argument("--merge", default=None,
                   help="comma-separated result files to put side by side in --out (per "
                        "family and seed; feature sets named with their backbone), no runs")
    p.add_argument("--features", default=",".join(FEATURES),
                   help=f"feature sets, of {FEATURES + VARIANTS}")
    a = p.parse_args()
    unknown = set(a.features.split(",")) - set(FEATURES + VARIANTS)
    if unknown:
        p.error(f"--features: unknown {sorted(unknown)}; choose from {FEATURES + VARIANTS}")
    warnings.filterwarnings("ignore")
    from emdpo_ray.utils import atomic_write_json, atomic_write_text

    if a.merge:
        results = merged(a.merge.split(","))
        command = shlex.join(['python', 'experiments/start_features.py', *sys.argv[1:]])
        atomic_write_json(a.out, results)
        atomic_write_text(a.out[:-5] + ".md", HEADER.format(json=os.path.basename(a.out))
                          + VARIANTS_NOTE + "Runs merged here, each by its command:\n\n"
                          + "".join(f"- `{c}`\n" for c in dict.fromkeys(
                              r["command"] for m in a.merge.split(",")
                              for r in json.load(open(m)) if "command" in r))
                          + f"\nMerged by `{command}`.\n\n" + table(results)
                          + paired_over_seeds(results) + "\n")
        return 0
    runs = os.path.join(REPO, "runs", "starts")
    results = []
    l2s = tuple(sorted(map(float, a.l2s.split(",")), reverse=True))
    further = tuple(map(float, a.further.split(","))) if a.further else None
    if a.tiny and a.sft_lr is None:  # another width: the tiny model's rate for it
        from emdpo_ray.config import load_config
        from emdpo_ray.train.sft import default_sft_rate

        a.sft_lr = default_sft_rate(load_config(None, [
            f"model.tiny.{o}" for o in a.tiny.split(",")]).model)
    for family in a.families.split(","):
        for seed in map(int, a.seeds.split(",")):
            results.append(one(family, seed, runs, a.features.split(","), a.reference, l2s,
                               further, tuple(filter(None, a.tiny.split(","))), a.sft_lr))
            command = shlex.join(['python', 'experiments/start_features.py', *sys.argv[1:]])
            results[-1]["command"] = command  # what --merge cites
            atomic_write_json(a.out, results)
            note = VARIANTS_NOTE if set(a.features.split(",")) & set(VARIANTS) else ""
            if a.reference:
                note += (f"The reference's states here are `{a.reference}`'s, as published (not "
                         "fine-tuned on the responses), in place of each run's SFT reference: "
                         f"`{command}`.\n\n")
            if a.tiny or a.sft_lr:
                note += (f"The tiny reference here is built with `{a.tiny or 'its defaults'}`"
                         + (f" and its SFT (and its copies') at a learning rate of {a.sft_lr:g}"
                            if a.sft_lr else "") + f": `{command}`.\n\n")
            if l2s != (1e-2, 1e-3, 1e-4):
                note += (f"The start's L2 path here is {', '.join(f'{v:g}' for v in l2s)} "
                         f"(`start` at {l2s[0]:g}, the next columns down the path; `labels, "
                         "once` still at 1e-2): "
                         f"`{command}`.\n\n")
            if sys.argv[1:] and command not in note:
                note += f"Command: `{command}`.\n\n"
            atomic_write_text(a.out[:-5] + ".md", HEADER.format(json=os.path.basename(a.out))
                              + note + table(results) + paired_over_seeds(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
