"""What the reference model sees in each response: features for the start (train/start.py).

A response's representation is the reference's hidden states at its middle layer and its
token embeddings (em.init_layers), each pooled over its first sentence, its middle sentences
and its last sentence (em.init_pooling 'sentences', the default), or over the response tokens
in `segments` equal parts (beginning, middle, end, ...: 'thirds', for text with no sentence
ends), concatenated. The embeddings say which words a part holds, which the middle layer's
states keep only in part (a ridge regression on those states carries 90% of `order`'s
rewards, on both layers 95%); side by side, `order`'s start 0.800 -> 0.825 over fifteen
seeds (docs/start_layers-order.md). By sentence, the opening is read whole and alone: a
third of the tokens cuts sentences of any length (docs/start_features-order-sentences.md:
`order`'s start 0.78 -> 0.82 over five seeds).
The middle layer, not the last: the last specialises in predicting the next token, and on
every synthetic family the middle one's start recovered the types better
(docs/start_features.md). Pooling by part keeps *where* things are said (token counts
cannot: reordered sentences have the same counts), and hidden states are conditioned on the
prompt. The prompt's own representation is the last layer's state at its last token, the
one that predicts the response's first token: what the model reads in the prompt as a whole
(train/context_features.py crosses the responses' counts with it). Wide models' states
(each layer's apart) are projected down to `dims` with a fixed Gaussian projection, so the
start's cost does not grow with them; narrower ones are kept whole (a projection of the tiny model's 144 to 64
dimensions cost the `order` start ARI: `make starts`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from emdpo_ray.models.bank import REFERENCE
from emdpo_ray.models.scoring import flat_rows

SEGMENTS = 3   # beginning, middle, end
DIMS = 192     # wider features are projected down to this (the tiny model's 3 x 48 are not)


def segment_pool(hidden: torch.Tensor, loss_mask: torch.Tensor, segments: int) -> torch.Tensor:
    """[B, T, H] states, [B, T] response mask -> [B, segments * H]: mean state of the
    response tokens in each of `segments` equal parts of the response (0 where a part has no
    token). The mask is used as is: token t's state is the one that predicts token t + 1,
    so the response's own tokens are read, the prompt only through them."""
    m = loss_mask.to(hidden.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1)
    pos = (m.cumsum(1) - 1) / n                       # 0 ... (n-1)/n within the response
    parts = []
    for s in range(segments):
        w = m * (pos >= s / segments) * (pos < (s + 1) / segments)
        parts.append((hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(parts, -1)


def sentence_pool(hidden: torch.Tensor, loss_mask: torch.Tensor, input_ids: torch.Tensor,
                  end_ids: torch.Tensor, summed: bool = False) -> torch.Tensor:
    """[B, T, H] states -> [B, 3 * H]: mean state (`summed`: the sum) over the response's
    first sentence, its middle sentences and its last sentence (0 where there is none),
    sentences ending at the tokens `end_ids` ('.', '!', '?', newlines). Where a response
    opens and closes, not where its tokens' thirds fall: a third of the tokens cuts sentences
    of any length. Sums, as a DPO reward sums over tokens, recovered `order`'s types no better
    than means (docs/start_features-order-summed.md), so the start averages."""
    m = loss_mask.to(hidden.dtype)
    # response tokens are the labels of masked positions: the inputs one step later
    in_resp = torch.zeros_like(loss_mask, dtype=torch.bool)
    in_resp[:, 1:] = loss_mask[:, :-1].bool()
    ends = torch.isin(input_ids, end_ids) & in_resp
    sent = (ends.cumsum(1) - ends.to(torch.int64)).to(hidden.dtype)   # ends read so far, not this one
    last = (sent * m).amax(1, keepdim=True)
    parts = [m * (sent == 0), m * (sent > 0) * (sent < last), m * (sent == last) * (last > 0)]
    n = [1 if summed else w.sum(1, keepdim=True).clamp_min(1) for w in parts]
    return torch.cat([(hidden * w[..., None]).sum(1) / c for w, c in zip(parts, n)], -1)


def sentence_end_ids(tokenizer) -> np.ndarray:
    """Ids of the tokens that end a sentence: those whose text ends in '.', '!', '?' or a
    newline."""
    ids = [i for t, i in tokenizer.get_vocab().items()
           if tokenizer.convert_tokens_to_string([t]).rstrip(" ").endswith((".", "!", "?", "\n"))]
    return np.array(sorted(ids), np.int64)


def projection(width: int, dims: int, seed: int = 0) -> np.ndarray | None:
    """[width, dims] Gaussian projection, or None when the features are narrow enough."""
    if width <= dims:
        return None
    return (np.random.default_rng(seed).normal(size=(width, dims)) / np.sqrt(dims)).astype(np.float32)


class Representations(NamedTuple):
    responses: np.ndarray   # [n, m, D] segment-pooled states of the layers, 0 for padding
    prompts: np.ndarray     # [n, P] last-layer state at each record's last prompt token


def prompt_state(hidden: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] states, [B, T] response mask -> [B, H]: the state at the last token before
    the response, which has read the whole prompt (and in a causal model nothing else)."""
    first = loss_mask.to(torch.int64).argmax(1)          # the response's first token
    return hidden[torch.arange(len(hidden)), (first - 1).clamp_min(0)]


def layer_index(layer: int | None, count: int) -> int:
    """Index into a model's `count` hidden states (embeddings first): None is the middle."""
    return count // 2 if layer is None else layer


def reference_representations(model, arrays: dict, device, segments: int = SEGMENTS,
                              dims: int = DIMS, rows_per_batch: int = 256,
                              layers: tuple[int | None, ...] = (None,),
                              end_ids: np.ndarray | None = None,
                              summed: bool = False) -> Representations:
    """Every response's segment-pooled states from each hidden layer of `layers` (0 the
    token embeddings, -1 the last, None the middle layer), side by side, and every prompt's
    prompt_state from the last layer, in one forward per batch; each layer's pooled states
    and the prompts' projected to `dims` when wider."""
    n, m = arrays["resp_mask"].shape
    per = max(1, rows_per_batch // m)
    resp = prompts = projs = None
    with torch.no_grad():
        for s in range(0, n, per):
            idx = np.arange(s, min(n, s + per))
            rows = flat_rows(arrays, np.stack([idx, np.full(len(idx), REFERENCE)], 1), device)
            states = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                           output_hidden_states=True).hidden_states
            fs = []
            for layer in layers:
                h = states[layer_index(layer, len(states))].float()
                fs.append((segment_pool(h, rows["loss_mask"], segments) if end_ids is None else
                           sentence_pool(h, rows["loss_mask"], rows["input_ids"],
                                         torch.as_tensor(end_ids), summed)).cpu().numpy())
            g = prompt_state(states[-1].float(), rows["loss_mask"]).cpu().numpy()
            if resp is None:  # the first layer's projection seeded 0, as when it was alone
                projs = [projection(f.shape[1], dims, seed=0 if i == 0 else i + 1)
                         for i, f in enumerate(fs)]
                proj_p = projection(g.shape[1], dims, seed=1)
                width = sum(f.shape[1] if q is None else dims for f, q in zip(fs, projs))
                resp = np.zeros((n, m, width), np.float32)
                prompts = np.zeros((n, g.shape[1] if proj_p is None else dims), np.float32)
            f = np.concatenate([f if q is None else f @ q for f, q in zip(fs, projs)], -1)
            p_idx, j_idx = (t.numpy() for t in rows["scatter"])
            resp[idx[p_idx], j_idx] = f
            # every response's row holds the same prompt: any of them gives its state
            prompts[idx[p_idx]] = g if proj_p is None else g @ proj_p
    if resp is None:
        return Representations(np.zeros((n, m, 0), np.float32), np.zeros((n, 0), np.float32))
    return Representations(resp, prompts)


def response_representations(model, arrays: dict, device, segments: int = SEGMENTS,
                             dims: int = DIMS, rows_per_batch: int = 256,
                             layers: tuple[int | None, ...] = (None,),
                             end_ids: np.ndarray | None = None,
                             summed: bool = False) -> np.ndarray:
    """[n, m, D]: reference_representations' responses alone."""
    return reference_representations(model, arrays, device, segments, dims, rows_per_batch,
                                     layers, end_ids, summed).responses
