"""Loading models and tokenizers safely, from a folder, a hub id, an offline name or s3://.

Weights load from safetensors only unless `model.allow_pickle`; a model's own code runs only
with `model.trust_remote_code`. Both are checked before anything is loaded.
"""

from __future__ import annotations

import json
import os

import torch

from emdpo_ray.config import ModelConfig


def resolve_local(path: str) -> str:
    """A model folder on shared storage (s3://...) is pulled to this node's cache once; an
    offline model name (model_sources.OFFLINE) is converted on this node once."""
    from emdpo_ray.models.sources import OFFLINE, resolve_named_model
    from emdpo_ray.run.storage import RunStore, is_remote

    if path in OFFLINE:
        return resolve_named_model(ModelConfig(name_or_path=path))
    return RunStore(path).pull() if is_remote(path) else path


def load_tokenizer(path: str, cfg: ModelConfig | None = None):
    from transformers import AutoTokenizer

    path = resolve_local(path)
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

    path = resolve_local(path)
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
    path = resolve_local(path)
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


def context_length(path: str, cfg: ModelConfig) -> int:
    """The model's context window in tokens (2048 when its config does not say)."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(resolve_local(path), trust_remote_code=cfg.trust_remote_code)
    return int(getattr(mc, "max_position_embeddings", 2048))
