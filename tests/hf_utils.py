"""Tiny random transformers Mixtral models saved as Hugging Face directories (test references)."""

from __future__ import annotations

import pathlib

import torch
import transformers

TINY_HF = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
               num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
               initializer_range=0.2)  # weights large enough that attention and routing are far from uniform


def make_hf_model(tmp_path: pathlib.Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  max_shard_size: str | None = None, name: str = "hf", **config):
    """A random MixtralForCausalLM (eager attention, TINY_HF + `config`) saved to tmp_path/name.

    Norm weights are randomised too, so a wrong norm mapping cannot hide
    behind all-ones. Returns (model in eval mode, its directory).
    """
    hf_config = transformers.MixtralConfig(**{**TINY_HF, **config})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name_, weight in model.named_parameters():
            if name_.endswith("norm.weight"):
                weight.copy_(1 + 0.2 * torch.randn_like(weight))
    model = model.to(dtype)
    directory = pathlib.Path(tmp_path) / name
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model, directory
