"""A tiny Qwen2 causal LM in float64 for gradient checks on CPU (random weights, no tokenizer, no hub)."""

from __future__ import annotations

import torch


def tiny_qwen2(*, tied: bool, vocab: int = 300) -> torch.nn.Module:
    """Two layers, hidden 64, seeded: the same weights on every call."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).train()
