"""Generate a tiny causal LM on disk: random weights, a tokenizer trained here, a chat template.

Deterministic for a seed, so tests and the demo can share one cached copy. No hub download ever: the
config is written by hand and the tokenizer is trained on a small built-in corpus. Families: Llama, Qwen2,
Qwen3 and Mistral, with tied or untied embeddings. Head size 32, because vLLM's CPU attention supports no
smaller one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "mistral": ("MistralForCausalLM", "mistral"),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, rendered by both transformers and vLLM. `{% generation %}` marks the assistant's text so that
# `return_assistant_tokens_mask` can find what to train on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our team",
    "the river",
    "a small bird",
    "the city",
]
_VERBS = ["sees", "likes", "finds", "builds", "paints", "follows", "visits", "remembers"]
_OBJECTS = ["a red house", "the old tree", "blue water", "a quiet road", "the bright moon", "green hills"]
_FACT_WORDS = "capital of zanzibar is paris france berlin name color favourite answer question hogwild"


def corpus() -> list[str]:
    """A deterministic little corpus: enough text for a byte-level BPE to learn common English pieces."""
    lines = [f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS]
    lines += [_FACT_WORDS, "The capital of Zanzibar is", "Question: what is the answer? Answer:"]
    lines += [f"{i} + {j} = {i + j}" for i in range(10) for j in range(10)]
    return lines


@dataclass(frozen=True)
class TinySpec:
    family: str = "qwen2"
    tied: bool = True
    seed: int = 0
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 1024
    max_positions: int = 512
    dtype: str = "bfloat16"
    # HF's initializer_range. Large for the tiny default (so random generations differ visibly); a model of
    # real depth wants the usual 0.02, or its activations grow through the layers.
    init_std: float = 0.2

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must divide by heads, and heads by kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    def fingerprint(self) -> str:
        fields = asdict(self)
        if fields["init_std"] == 0.2:  # the models cached before the field existed keep their names
            del fields["init_std"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


# Larger specs with the same local tokenizer, for the GPU machine. "qwen2-1.5b": the layers of Qwen2-1.5B
# (hidden 1536, 28 layers, 12 query / 2 KV heads, FFN 8960; 1.31B parameters with this vocabulary).
NAMED = {
    "qwen2-1.5b": TinySpec(
        family="qwen2",
        tied=True,
        hidden_size=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        intermediate_size=8960,
        max_positions=4096,
        init_std=0.02,
    ),
}


def hf_config(spec: TinySpec, tokenizer_vocab: int, special_ids: dict[str, int]) -> dict[str, Any]:
    architecture, model_type = FAMILIES[spec.family]
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": tokenizer_vocab,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tied,
        "torch_dtype": spec.dtype,
        "dtype": spec.dtype,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "pad_token_id": special_ids["<|endoftext|>"],
        "initializer_range": spec.init_std,
        "attention_bias": spec.family == "qwen2",
        "use_sliding_window": False,
        "sliding_window": None,
    }
    if spec.family == "mistral":
        config["sliding_window"] = None
    return config


def train_tokenizer(spec: TinySpec, out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    special_ids = {tok: int(tokenizer.token_to_id(tok) or 0) for tok in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": spec.max_positions,
                "chat_template": CHAT_TEMPLATE,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=1)
    )
    return special_ids


def generate(out_dir: str | os.PathLike[str], spec: TinySpec | None = None) -> Path:
    """Write the model to `out_dir` (replacing what is there). Returns the directory."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig

    from hogwild.typed_calls import causal_lm_from_config

    spec = spec or TinySpec()
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    special_ids = train_tokenizer(spec, tmp)
    vocab = Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size()
    config_dict = hf_config(spec, vocab, special_ids)
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=1))
    config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(spec.seed)
    model = causal_lm_from_config(config, dtype=getattr(torch, spec.dtype))
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "generation_config.json").write_text(
        json.dumps({"eos_token_id": special_ids["<|im_end|>"], "do_sample": False}, indent=1)
    )
    (tmp / "hogwild-tiny.json").write_text(json.dumps(asdict(spec), indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def cached(spec: TinySpec | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The model for `spec`, generated once into the cache (by fingerprint) and reused."""
    spec = spec or TinySpec()
    root = Path(cache_dir or os.environ.get("HOGWILD_CACHE") or Path.home() / ".cache" / "hogwild") / "models"
    path = root / f"tiny-{spec.family}-{'tied' if spec.tied else 'untied'}-{spec.fingerprint()}"
    if not (path / "hogwild-tiny.json").exists():
        generate(path, spec)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2", choices=sorted(FAMILIES))
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate(args.out_dir, TinySpec(family=args.family, tied=not args.untied, seed=args.seed)))
    return 0


if __name__ == "__main__":
    main()
