"""The default base model: a tiny Llama with a byte-level BPE trained on the records' text.

Seeded and saved in Hugging Face format (safetensors) in the run directory, so every worker
and the server load the very same files without any hub.
"""

from __future__ import annotations

import os

import torch

from emdpo_ray.config import ModelConfig
from emdpo_ray.utils import atomic_write_json

SPECIALS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


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
