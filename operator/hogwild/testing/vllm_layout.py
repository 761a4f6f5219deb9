"""vLLM's weight layout for dense Llama-style models, and a forward pass that computes with it.

The stand-in exporter (hogwild.testing.exporter) must hold weights exactly as vLLM 0.32 does, so that what
the worker maps in tests is what it maps in a pod (docs/facts.md "Zero-copy weights" and "vLLM's GPU path"):
- q/k/v fused into `qkv_proj` (rows q = heads*head_dim, then k and v = kv_heads*head_dim; bias too, as in
  Qwen2); gate/up fused into `gate_up_proj` (rows gate, then up);
- `embed_tokens` and `lm_head` padded to a multiple of 64 rows with zeros;
- tied models list only `model.embed_tokens.weight`;
- everything else (o_proj, down_proj, norms, Qwen3's q_norm/k_norm) under Hugging Face's own names.

`fused_forward` computes logits from those fused tensors the way vLLM's kernels do (one GEMM for qkv, one
for gate/up), independently of transformers: a test compares it with the HF model, which checks the layout
itself, and the GPU benchmark uses it as the "serving" load. Pure: tensors in, tensors out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

VOCAB_PADDING = 64
_PROJ = re.compile(
    r"^(?P<prefix>.*\.)(?P<proj>q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?P<kind>weight|bias)$"
)
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}
_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def pad_rows(tensor: Tensor, multiple: int = VOCAB_PADDING) -> Tensor:
    rows = math.ceil(tensor.shape[0] / multiple) * multiple
    if rows == tensor.shape[0]:
        return tensor.clone()
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def vllm_layout(hf_state: Mapping[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """Hugging Face state dict -> vLLM's parameters (new tensors, in HF order of first appearance)."""
    out: dict[str, Tensor | None] = {}
    parts: dict[str, list[Tensor | None]] = {}
    for name, tensor in hf_state.items():
        if tied and name == "lm_head.weight":
            continue  # vLLM's lm_head IS embed_tokens: named_parameters lists it once
        match = _PROJ.match(name)
        if match is None:
            out[name] = pad_rows(tensor) if name in _VOCAB else tensor.clone()
            continue
        fused = f"{match['prefix']}{_FUSED[match['proj']]}.{match['kind']}"
        slots = parts.setdefault(
            fused, [None, None, None] if _FUSED[match["proj"]] == "qkv_proj" else [None, None]
        )
        slots[_ORDER[match["proj"]]] = tensor
        out.setdefault(fused, None)
    for fused, slots in parts.items():
        if any(s is None for s in slots):
            raise ValueError(f"{fused}: the model lacks one of its parts")
        out[fused] = torch.cat([s for s in slots if s is not None], dim=0)
    return {name: tensor for name, tensor in out.items() if tensor is not None}


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # As HF and vLLM do: normalize in fp32, scale in the weight's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_theta(cfg: Mapping[str, Any]) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope(q: Tensor, k: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    seq, dim = q.shape[-2], q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=q.device) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=q.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

    def rotate(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def _attention(p: Mapping[str, Tensor], prefix: str, h: Tensor, cfg: Mapping[str, Any]) -> Tensor:
    batch, seq, _ = h.shape
    heads, kv_heads = (
        int(cfg["num_attention_heads"]),
        int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
    )
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    qkv = F.linear(h, p[f"{prefix}qkv_proj.weight"], p.get(f"{prefix}qkv_proj.bias"))
    q, k, v = torch.split(qkv, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(batch, seq, heads, head_dim)
    k = k.view(batch, seq, kv_heads, head_dim)
    if f"{prefix}q_norm.weight" in p:  # Qwen3: per-head RMSNorm before RoPE
        q = _rms_norm(q, p[f"{prefix}q_norm.weight"], eps)
        k = _rms_norm(k, p[f"{prefix}k_norm.weight"], eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    q, k = _rope(q, k, rope_theta(cfg))
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(batch, seq, heads * head_dim), p[f"{prefix}o_proj.weight"])


@torch.no_grad()
def fused_forward(params: Mapping[str, Tensor], cfg: Mapping[str, Any], input_ids: Tensor) -> Tensor:
    """Logits [batch, seq, vocab_size] computed from vLLM-layout weights (full causal attention, no cache)."""
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    x = F.embedding(input_ids, params["model.embed_tokens.weight"])
    for layer in range(int(cfg["num_hidden_layers"])):
        prefix = f"model.layers.{layer}."
        h = _rms_norm(x, params[f"{prefix}input_layernorm.weight"], eps)
        x = x + _attention(params, f"{prefix}self_attn.", h, cfg)
        h = _rms_norm(x, params[f"{prefix}post_attention_layernorm.weight"], eps)
        gate, up = F.linear(h, params[f"{prefix}mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, params[f"{prefix}mlp.down_proj.weight"])
    x = _rms_norm(x, params["model.norm.weight"], eps)
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return F.linear(x, head)[..., : int(cfg["vocab_size"])]
