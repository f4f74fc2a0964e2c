"""Tiny default model, tokenizer training, batched sequence log-probs, packed scoring rows,
multi-adapter bank."""

import numpy as np
import pytest
import torch

from emdpo_ray.config import Config
from emdpo_ray.data.encode import encode
from emdpo_ray.models.bank import PolicyBank
from emdpo_ray.models.loading import load_base, load_tokenizer
from emdpo_ray.models.scoring import pair_logps
from emdpo_ray.models.tiny import build_tiny_model
from emdpo_ray.data.sources import load_records

from conftest import sequence_logps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synth_data):
    recs = load_records(synth_data)
    cfg = Config()
    texts = [t for r in recs for t in (r.prompt, *r.responses)]
    out = str(tmp_path_factory.mktemp("m") / "base")
    build_tiny_model(texts, out, cfg.model, seed=0)
    return out, recs, cfg, texts


def test_tokenizer_round_trip_and_determinism(tiny, tmp_path):
    path, recs, cfg, texts = tiny
    tok = load_tokenizer(path)
    s = recs[0].responses[2]
    assert tok.decode(tok(s)["input_ids"]) == s
    assert len(tok) <= cfg.model.tiny.vocab_size and len(tok("rivers")["input_ids"]) >= 1
    other = str(tmp_path / "again")
    build_tiny_model(texts, other, cfg.model, seed=0)
    assert load_tokenizer(other).get_vocab() == tok.get_vocab()
    a, b = load_base(path, cfg.model), load_base(other, cfg.model)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_tiny_model_size_and_save_load_identical_logits(tiny, tmp_path):
    path, _, cfg, _ = tiny
    m = load_base(path, cfg.model).eval()
    n = sum(p.numel() for p in m.parameters())
    assert 50_000 < n < 200_000
    m.save_pretrained(tmp_path / "copy", safe_serialization=True)
    assert (tmp_path / "copy" / "model.safetensors").exists()
    m2 = load_base(str(tmp_path / "copy"), cfg.model).eval()
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(m(input_ids=ids).logits, m2(input_ids=ids).logits, rtol=0,
                               atol=0)


def naive_logp(model, ids, start, end):
    """One sequence at a time: sum of log p(token_t | tokens_<t) over response positions."""
    with torch.no_grad():
        logits = model(input_ids=ids[None, :end]).logits[0].log_softmax(-1)
    return sum(logits[t - 1, ids[t]].item() for t in range(start, end))


def test_batched_sequence_logps_match_naive_loop(tiny):
    path, recs, cfg, _ = tiny
    tok = load_tokenizer(path)
    m = load_base(path, cfg.model).eval()
    enc = encode(recs[:5], tok, cfg.data)
    n, k, t = enc.input_ids.shape
    ids = torch.as_tensor(enc.input_ids.reshape(n * k, t), dtype=torch.long)
    att = torch.as_tensor(enc.attention_mask.reshape(n * k, t), dtype=torch.long)
    lm = torch.as_tensor(enc.loss_mask.reshape(n * k, t))
    with torch.no_grad():
        got, cnt = sequence_logps(m, ids, att, lm)
    for row in range(n * k):
        pos = np.nonzero(enc.loss_mask.reshape(n * k, t)[row])[0]
        want = naive_logp(m, ids[row], int(pos[0]), int(pos[-1]) + 1)
        assert got[row].item() == pytest.approx(want, abs=1e-4)
        assert cnt[row].item() == len(pos)


def test_ranked_order_and_truncation_rule(tiny):
    path, recs, cfg, _ = tiny
    tok = load_tokenizer(path)
    short = cfg.data.model_copy(update={"max_prompt_tokens": 2, "max_response_tokens": 3})
    enc = encode(recs[:3], tok, short)
    assert enc.truncated_prompts == 3 and enc.truncated_responses > 0
    r = recs[0]
    first = enc.input_ids[0, 0][enc.loss_mask[0, 0] == 1].tolist()
    # best response first, cut to its first 3 tokens, then end-of-text
    assert first == tok(r.ranked[0], add_special_tokens=False)["input_ids"][:3] + [tok.eos_token_id]
    prompt = enc.input_ids[0, 0][(enc.loss_mask[0, 0] == 0) & (enc.attention_mask[0, 0] == 1)]
    assert prompt.tolist() == [tok.bos_token_id] + tok(r.prompt, add_special_tokens=False)["input_ids"][-2:]


def distinct_bank(path, cfg, names):
    """A bank whose adapters differ from the base and from each other."""
    bank = PolicyBank(load_base(path, cfg.model), cfg.model, names)
    with torch.no_grad():
        for n, p in bank.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return bank


def test_packed_pair_logps_match_each_response_alone(tiny):
    """Prompts shared across responses and rankings packed into rows score every response
    exactly as its own unpadded forward does, under the reference and under a policy."""
    path, recs, cfg, _ = tiny
    tok = load_tokenizer(path)
    names = ["type_0", "type_1"]
    bank = distinct_bank(path, cfg, names)
    arrays = encode(recs[:4], tok, cfg.data).arrays()
    pairs = np.array([[0, 0], [1, 1], [2, -1], [3, 0], [0, 1], [1, -1]])
    with torch.no_grad():
        got, cnt, mask = pair_logps(bank.logps, arrays, pairs, torch.device("cpu"))
        for i, (r, k) in enumerate(pairs):
            for j in np.nonzero(arrays["resp_mask"][r])[0]:
                pos = np.nonzero(arrays["loss_mask"][r, j])[0]
                ids = torch.as_tensor(arrays["input_ids"][r, j], dtype=torch.long)
                if k >= 0:
                    bank.model.set_adapter(names[k])
                    want = naive_logp(bank.model, ids, int(pos[0]), int(pos[-1]) + 1)
                else:
                    with bank.model.disable_adapter():
                        want = naive_logp(bank.model, ids, int(pos[0]), int(pos[-1]) + 1)
                assert got[i, j].item() == pytest.approx(want, abs=1e-4)
                assert cnt[i, j].item() == len(pos)
    assert mask.tolist() == arrays["resp_mask"][pairs[:, 0]].tolist()
    assert not torch.allclose(got[0], got[4])  # the two adapters differ


def test_bank_save_and_warm_start_score_identically(tiny, tmp_path):
    path, recs, cfg, _ = tiny
    names = ["type_0", "type_1"]
    bank = distinct_bank(path, cfg, names)
    arrays = encode(recs[:3], load_tokenizer(path), cfg.data).arrays()
    pairs = np.array([[0, 0], [1, 1], [2, -1]])
    bank.save(str(tmp_path / "policies"))
    for n in names:
        assert (tmp_path / "policies" / n / "adapter_model.safetensors").exists()
    again = PolicyBank(load_base(path, cfg.model), cfg.model, names,
                       init_from=str(tmp_path / "policies"))
    with torch.no_grad():
        torch.testing.assert_close(pair_logps(again.logps, arrays, pairs, "cpu")[0],
                                   pair_logps(bank.logps, arrays, pairs, "cpu")[0])


def test_an_adapter_on_the_output_head_is_refused(tiny):
    from emdpo_ray.config import ConfigError

    path, _, cfg, _ = tiny
    lora = cfg.model.lora.model_copy(update={"target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match="output head"):
        PolicyBank(load_base(path, cfg.model), cfg.model.model_copy(update={"lora": lora}),
                   ["type_0"])


def test_top_p_filter_keeps_the_nucleus_and_never_empties_a_row():
    from emdpo_ray.models.decoding import _top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.5, 0.3, 0.2]]))
    # mass before each sorted token: 0, 0.5, 0.8 -> top_p 0.6 keeps two, 1.0 keeps all,
    # and a top_p that is 0 in float32 still keeps the likeliest token.
    out = _top_p_filter(logits, torch.tensor([0.6, 1.0, 5e-324]))
    assert torch.isfinite(out).tolist() == [[True, True, False], [True, True, True],
                                            [True, False, False]]


def test_reference_features_come_from_the_middle_layer(tiny):
    from emdpo_ray.models.features import response_representations, segment_pool

    path, recs, cfg, _ = tiny
    model, tok = load_base(path, cfg.model).eval(), load_tokenizer(path)
    arrays = encode(recs[:4], tok, cfg.data).arrays()
    cpu = torch.device("cpu")
    default = response_representations(model, arrays, cpu)
    assert cfg.model.tiny.num_hidden_layers == 2   # states: embeddings, layer 1, layer 2
    np.testing.assert_array_equal(default, response_representations(model, arrays, cpu, layers=(1,)))
    assert not np.allclose(default, response_representations(model, arrays, cpu, layers=(-1,)))
    # by hand for record 0, response 0: layer 1's states pooled over the response's thirds
    ids = torch.as_tensor(arrays["input_ids"][0, :1]).long()
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=torch.as_tensor(arrays["attention_mask"][0, :1]).long(),
                  output_hidden_states=True).hidden_states[1]
    want = segment_pool(h, torch.as_tensor(arrays["loss_mask"][0, :1]).float(), 3)[0].numpy()
    np.testing.assert_allclose(default[0, 0], want, rtol=1e-4, atol=1e-5)


def test_reference_features_put_their_layers_side_by_side(tiny):
    # the start's default (em.init_layers): the middle layer's pooled states, then the token
    # embeddings' pooled the same way; each block as when that layer is read alone, and a
    # block wider than `dims` projected on its own, the first as it was alone
    from emdpo_ray.config import load_config
    from emdpo_ray.models.features import response_representations

    path, recs, cfg, _ = tiny
    model, tok = load_base(path, cfg.model).eval(), load_tokenizer(path)
    arrays = encode(recs[:4], tok, cfg.data).arrays()
    cpu = torch.device("cpu")
    assert load_config(None, []).start_layers == (None, 0)
    both = response_representations(model, arrays, cpu, layers=(None, 0))
    width = 3 * cfg.model.tiny.hidden_size
    assert both.shape[-1] == 2 * width
    np.testing.assert_array_equal(both[..., :width], response_representations(model, arrays, cpu))
    np.testing.assert_array_equal(both[..., width:],
                                  response_representations(model, arrays, cpu, layers=(0,)))
    narrow = response_representations(model, arrays, cpu, dims=width // 2, layers=(None, 0))
    assert narrow.shape[-1] == width
    np.testing.assert_allclose(narrow[..., :width // 2], response_representations(
        model, arrays, cpu, dims=width // 2), rtol=1e-5, atol=1e-6)


def test_reference_features_by_sentence_read_the_first_sentence_whole(tiny):
    """em.init_pooling=sentences with the tiny model's own tokenizer: the first part is the
    mean state from the last prompt token through the response's first '.', found here from
    the decoded text."""
    from emdpo_ray.models.features import response_representations, sentence_end_ids

    path, recs, cfg, _ = tiny
    model, tok = load_base(path, cfg.model).eval(), load_tokenizer(path)
    arrays = encode(recs[:4], tok, cfg.data).arrays()
    got = response_representations(model, arrays, torch.device("cpu"),
                                   end_ids=sentence_end_ids(tok))
    ids = arrays["input_ids"][0, 0]
    masked = np.nonzero(arrays["loss_mask"][0, 0])[0]
    first_end = next(t for t in range(masked[0] + 1, masked[-1] + 2)
                     if tok.decode([int(ids[t])]).strip().endswith((".", "!", "?")))
    with torch.no_grad():
        h = model(input_ids=torch.as_tensor(ids[None]).long(),
                  attention_mask=torch.as_tensor(arrays["attention_mask"][0, :1]).long(),
                  output_hidden_states=True).hidden_states[1][0]
    want = h[masked[0]:first_end + 1].mean(0).numpy()
    width = cfg.model.tiny.hidden_size
    np.testing.assert_allclose(got[0, 0, :width], want, rtol=1e-4, atol=1e-5)
    assert got.shape[-1] == 3 * width


def test_prompt_state_is_the_last_layers_state_before_the_response(tiny):
    from emdpo_ray.models.features import reference_representations

    path, recs, cfg, _ = tiny
    model, tok = load_base(path, cfg.model).eval(), load_tokenizer(path)
    arrays = encode(recs[:4], tok, cfg.data).arrays()
    reps = reference_representations(model, arrays, torch.device("cpu"))
    assert reps.prompts.shape == (4, cfg.model.tiny.hidden_size)
    # by hand for record 1: the last layer's state at the token before the first response
    # token, the same in every response's row (a causal model reads only the prompt there)
    first = int(np.argmax(arrays["loss_mask"][1, 0]))
    for j in range(int(arrays["resp_mask"][1].sum())):
        ids = torch.as_tensor(arrays["input_ids"][1, j:j + 1]).long()
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=torch.as_tensor(
                arrays["attention_mask"][1, j:j + 1]).long(), output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(reps.prompts[1], h[0, first - 1].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(reps.prompts[0], reps.prompts[1])   # other prompts, other states


def test_types_reads_a_models_states_or_its_reading_of_the_prompts(tiny):
    from emdpo_ray.config import load_config
    from emdpo_ray.train.num_types import types_report

    path, recs, _, _ = tiny
    cfg = load_config(None, ["em.init_restarts=2", "em.init_refine_iterations=3",
                             "em.init_l2=[0.01]"])
    for features, name in (("tokens", f"states of {path}"),
                           ("tokens_by_prompt_state", f"tokens_by_prompt_state of {path}")):
        rep = types_report(recs, cfg, 2, path, features=features)
        assert rep["features"] == name and rep["rows"][0]["types"] == 1
        assert rep["rows"][0]["heldout_loglik_per_ranking"] < 0
