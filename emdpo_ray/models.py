"""Base models and the K policies on top of them.

The default base (no `model.name_or_path`) is a tiny Llama from config with a byte-level BPE
trained on the records' own text, seeded, and saved in Hugging Face format in the run
directory, so every worker and the server load the very same files without any hub.

`PolicyBank` owns the K policies and the reference: with LoRA, K adapters on one base
(reference = adapters off, the `"__base__"` row name); with full fine-tuning, K copies and a
frozen reference. Its `logps` scores any mix of (row, policy) pairs in one batched forward.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from emdpo_ray.config import ModelConfig
from emdpo_ray.utils import atomic_write_json

SPECIALS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
REFERENCE = -1  # policy index meaning "the reference model"


def adapter_name(k: int) -> str:
    return f"type_{k}"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained in-process; deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def build_tiny_model(texts: list[str], out_dir: str, cfg: ModelConfig, seed: int) -> str:
    """Tokenizer + tiny Llama saved to `out_dir` (safetensors). Returns `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    tokenizer = train_tokenizer(texts, t.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out_dir.rstrip("/") + ".partial"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(os.path.join(tmp, "emdpo_tiny.json"), {"seed": seed, **t.model_dump()})
    os.replace(tmp, out_dir)  # the folder appears whole or not at all
    return out_dir


def _local(path: str) -> str:
    """A model folder on shared storage (s3://...) is pulled to this node's cache once; an
    offline model name (model_sources.OFFLINE) is converted on this node once."""
    from emdpo_ray.model_sources import OFFLINE, resolve_named_model
    from emdpo_ray.storage import RunStore, is_remote

    if path in OFFLINE:
        return resolve_named_model(ModelConfig(name_or_path=path))
    return RunStore(path).pull() if is_remote(path) else path


def load_tokenizer(path: str, cfg: ModelConfig | None = None):
    from transformers import AutoTokenizer

    path = _local(path)
    kw = {}
    if cfg is not None:
        kw = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.gguf_file:
            kw["gguf_file"] = cfg.gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(path: str, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = _local(path)
    kw = {"trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    else:
        check_model_safety(path, cfg)
        kw["use_safetensors"] = None if cfg.allow_pickle else True
    return AutoModelForCausalLM.from_pretrained(path, **kw)


class UnsafeModelError(ValueError):
    """A model needs pickle weights or its own code, and the config does not allow it."""


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_safety(path: str, cfg: ModelConfig) -> None:
    """Before anything loads a local model folder: its weights and its code."""
    path = _local(path)
    check_weights_format(path, cfg.allow_pickle)
    conf = os.path.join(path, "config.json")
    if not cfg.trust_remote_code and os.path.isfile(conf):
        with open(conf, encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map")
        if auto_map:
            code = sorted({str(v) for v in auto_map.values()}) if isinstance(auto_map, dict) \
                else [str(auto_map)]
            raise UnsafeModelError(
                f"{conf}: auto_map asks to run the model's own Python code ({', '.join(code)}); "
                "set model.trust_remote_code=true only if you trust its source")


def check_weights_format(path: str, allow_pickle: bool) -> None:
    """Refuse a local folder whose weights are pickles: unpickling runs arbitrary code."""
    if allow_pickle or not os.path.isdir(path):
        return
    files = os.listdir(path)
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
    if pickles:
        raise UnsafeModelError(
            f"{path}: weights are pickle files ({', '.join(pickles)}), which can run arbitrary "
            "code when loaded; convert them to safetensors, or set model.allow_pickle=true "
            "if you trust their source")


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of response-token log-probs per row, all rows in one forward pass.

    `loss_mask[b, t]` is 1 where token t belongs to the response; prompt and padding are 0.
    Token t is predicted from the logits at t-1, so the mask is shifted by one.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(logits.dtype)
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


class PolicyBank(nn.Module):
    """K policies plus the reference, scored per row in one batched forward."""

    def __init__(self, base: nn.Module, cfg: ModelConfig, names: list[str],
                 init_from: str | dict[str, str] | None = None):
        """`names` are the policies (PEFT adapter names). `init_from` is a folder holding a
        subfolder per name, or a {name: folder} map, to load or warm-start from; names not
        found there start fresh (LoRA B = 0, i.e. equal to the reference)."""
        super().__init__()
        self.kind = cfg.finetune
        self.names = list(names)

        def warm(name: str) -> str | None:
            if isinstance(init_from, dict):
                path = init_from.get(name)
            else:
                path = os.path.join(init_from, name) if init_from else None
            return path if path and os.path.isdir(path) else None

        if self.kind == "lora":
            from peft import LoraConfig, get_peft_model

            lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                            lora_dropout=cfg.lora.dropout,
                            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
            model = get_peft_model(base, lc, adapter_name=self.names[0])
            for name in self.names[1:]:
                model.add_adapter(name, lc)
            for name in self.names:
                if warm(name):
                    from peft.utils import set_peft_model_state_dict
                    from safetensors.torch import load_file

                    check_weights_format(warm(name), cfg.allow_pickle)
                    st = os.path.join(warm(name), "adapter_model.safetensors")
                    sd = load_file(st) if os.path.exists(st) else torch.load(
                        os.path.join(warm(name), "adapter_model.bin"), weights_only=True)
                    set_peft_model_state_dict(model, sd, adapter_name=name)
            # PEFT marks only the active adapter trainable; here every adapter trains at once.
            for n, p in model.named_parameters():
                p.requires_grad = "lora_" in n
            self.model = model
        else:
            import copy

            from transformers import AutoModelForCausalLM

            policies = []
            for name in self.names:
                if warm(name):
                    check_weights_format(warm(name), cfg.allow_pickle)
                    m = AutoModelForCausalLM.from_pretrained(
                        warm(name), dtype=base.dtype, trust_remote_code=cfg.trust_remote_code,
                        use_safetensors=None if cfg.allow_pickle else True)
                else:
                    m = copy.deepcopy(base)
                policies.append(m)
            self.policies = nn.ModuleList(policies)
            self.reference = base.requires_grad_(False)

    def logps(self, input_ids, attention_mask, loss_mask, policy: torch.Tensor):
        """Per-row summed response log-probs; `policy[b]` is a type index or REFERENCE."""
        if self.kind == "lora":
            names = [self.names[k] if k >= 0 else "__base__" for k in policy.tolist()]
            # PEFT mixes adapters per row only in eval mode; dropout is 0 so nothing changes.
            self.model.eval()
            return sequence_logps(self.model, input_ids, attention_mask, loss_mask,
                                  adapter_names=names)
        total = torch.zeros(len(policy), device=input_ids.device)
        count = torch.zeros(len(policy), device=input_ids.device)
        for k in policy.unique().tolist():
            rows = (policy == k).nonzero(as_tuple=True)[0]
            m = self.reference if k < 0 else self.policies[k]
            s, c = sequence_logps(m, input_ids[rows], attention_mask[rows], loss_mask[rows])
            total = total.index_put((rows,), s.to(total.dtype))
            count = count.index_put((rows,), c.to(count.dtype))
        return total, count

    def save(self, out_dir: str) -> None:
        """One folder per policy name: a PEFT adapter or a full model, safetensors."""
        os.makedirs(out_dir, exist_ok=True)
        if self.kind == "lora":
            self.model.save_pretrained(out_dir, selected_adapters=self.names,
                                       safe_serialization=True)
        else:
            for name, m in zip(self.names, self.policies):
                m.save_pretrained(os.path.join(out_dir, name), safe_serialization=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 policy: list[int], **gen_kwargs) -> torch.Tensor:
        """Left-padded prompts [B, T] -> [B, T + new] tokens, row b sampled from policy[b]."""
        if self.kind == "lora":
            self.model.eval()
            names = [self.names[k] if k >= 0 else "__base__" for k in policy]
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       adapter_names=names, **gen_kwargs)
        pad = gen_kwargs.get("pad_token_id", 0)
        outs: dict[int, torch.Tensor] = {}
        pol = torch.as_tensor(policy)
        for k in pol.unique().tolist():
            rows = (pol == k).nonzero(as_tuple=True)[0]
            m = self.reference if k < 0 else self.policies[k]
            outs[k] = (rows, m.generate(input_ids=input_ids[rows],
                                        attention_mask=attention_mask[rows], **gen_kwargs))
        width = max(o.shape[1] for _, o in outs.values())
        result = torch.full((len(policy), width), pad, dtype=input_ids.dtype)
        for rows, o in outs.values():
            result[rows, :o.shape[1]] = o
        return result


def prompt_token_ids(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Prompt tokens exactly as training sees them: bos + the last max_prompt_tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [bos + p[-max_prompt_tokens:] for p in ids]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r)
        att[i, width - len(r):] = 1
    return ids, att


def continuation_arrays(prompts: list[list[int]], continuations: list[list[int]],
                        pad_id: int) -> dict:
    """Arrays in the training layout ([n, 1, T]) for scoring prompt + continuation."""
    import numpy as np

    seqs = [p + c for p, c in zip(prompts, continuations)]
    t = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, 1, t), pad_id, dtype=np.int64)
    att = np.zeros((n, 1, t), dtype=np.int8)
    lm = np.zeros((n, 1, t), dtype=np.int8)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, 0, :len(s)] = s
        att[i, 0, :len(s)] = 1
        lm[i, 0, len(p):len(s)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm,
            "resp_mask": np.ones((n, 1), dtype=bool)}


def strip_generation(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to and including the first end-of-text; padding dropped."""
    out = []
    for t in tokens:
        out.append(t)
        if t == eos_id:
            break
    while out and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out
