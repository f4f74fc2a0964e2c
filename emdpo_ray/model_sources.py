"""Where a named base model comes from: a Hugging Face id or a local directory."""

from __future__ import annotations

from emdpo_ray.config import ModelConfig


def resolve_named_model(cfg: ModelConfig) -> str:
    """Return a path or id `from_pretrained` can open (the hub is only used if reachable)."""
    return cfg.name_or_path
