"""The K policies on one base, and the reference.

`PolicyBank` owns the K policies and the reference: with LoRA, K adapters on one base
(reference = adapters off, the `"__base__"` row name); with full fine-tuning, K copies and a
frozen reference. Its `logps` scores any mix of (row, policy) pairs in one batched forward.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from emdpo_ray.config import ConfigError, ModelConfig
from emdpo_ray.models.loading import check_weights_format, load_base, load_tokenizer

REFERENCE = -1  # policy index meaning "the reference model"


def token_logps(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, tok_row: torch.Tensor, pred_pos: torch.Tensor,
                label_pos: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Log-probs of the scored tokens of packed rows (models/packing.py), one forward.

    `attention_mask` is the boolean [R, 1, L, L] tree mask. The output head runs only on the
    hidden states that predict a scored token, not on every position of the vocabulary."""
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=input_ids.device)
    mask = mask.masked_fill(~attention_mask, torch.finfo(dtype).min)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                output_hidden_states=True, logits_to_keep=1, **forward_kwargs)
    hidden = out.hidden_states[-1][tok_row, pred_pos]
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    labels = input_ids[tok_row, label_pos]
    return logits.gather(1, labels[:, None]).squeeze(1) - logits.logsumexp(-1)


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
            if hasattr(model.get_output_embeddings(), "lora_A"):
                raise ConfigError("model.lora.target_modules: the output head cannot carry an "
                                 "adapter (scoring runs it outside the per-row adapter pass)")
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

    def logps(self, input_ids, position_ids, attention_mask, policy, tok_row, pred_pos,
              label_pos) -> torch.Tensor:
        """Log-probs of the scored tokens of packed rows; `policy[r]` is row r's type index or
        REFERENCE."""
        if self.kind == "lora":
            names = [self.names[k] if k >= 0 else "__base__" for k in policy.tolist()]
            # PEFT mixes adapters per row only in eval mode; dropout is 0 so nothing changes.
            self.model.eval()
            return token_logps(self.model, input_ids, position_ids, attention_mask, tok_row,
                               pred_pos, label_pos, adapter_names=names)
        out = torch.zeros(len(tok_row), device=input_ids.device)
        local = torch.zeros(len(policy), dtype=torch.long, device=input_ids.device)
        for k in policy.unique().tolist():
            rows = (policy == k).nonzero(as_tuple=True)[0]
            local[rows] = torch.arange(len(rows), device=input_ids.device)
            sel = (policy[tok_row] == k).nonzero(as_tuple=True)[0]
            m = self.reference if k < 0 else self.policies[k]
            lp = token_logps(m, input_ids[rows], position_ids[rows], attention_mask[rows],
                             local[tok_row[sel]], pred_pos[sel], label_pos[sel])
            out = out.index_put((sel,), lp.to(out.dtype))
        return out

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


def load_policy_bank(base_path: str, cfg: ModelConfig, dirs: dict[str, str]):
    """(tokenizer, PolicyBank in eval mode): the base plus the policies in `dirs` {name: folder
    or s3:// URI, pulled to this node's cache}."""
    from emdpo_ray.models.loading import resolve_local

    dirs = {n: resolve_local(d) for n, d in dirs.items()}
    bank = PolicyBank(load_base(base_path, cfg), cfg, list(dirs), init_from=dirs)
    return load_tokenizer(base_path, cfg), bank.eval()
