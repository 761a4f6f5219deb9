"""Correctness of every fast path against a float64 reference, on fresh random inputs (`--part check`).

Accuracy bands: fp32 arithmetic far under 1e-3; bf16 operands between 1e-3 and 1e-2; NaN never. Each
check draws new random inputs; none runs on zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gpu_reference import (
    BF16_MAX,
    FP32_MAX,
    ApolloSettings,
    reference_apollo,
    reference_update,
    relative_error,
)


def _result(error: float, band: str, **extra: Any) -> dict[str, Any]:
    limit = FP32_MAX if band == "fp32" else BF16_MAX
    return {"rel_err": error, "band": band, "ok": bool(error < limit), **extra}  # NaN < x is False


def check_rounding(device: torch.device) -> dict[str, Any]:
    """The fused stochastic-rounding update (Triton on CUDA) vs float64, and vs the eager path bit for bit."""
    from hogwild.optim.rounding import apply_update_, noise_keys

    out: dict[str, Any] = {}
    m, n = 1024, 4096
    coefs: dict[str, Callable[[], Any]] = {
        "scalar": lambda: 1e-3,
        "row": lambda: torch.rand(1, n, device=device) * 1e-3,
        "column": lambda: torch.rand(m, 1, device=device) * 1e-3,
    }
    for seed, (name, make_coef) in enumerate(coefs.items()):
        param = (torch.randn(m, n, device=device) * 0.02).to(torch.bfloat16)
        direction = torch.randn(m, n, device=device)
        coef = make_coef()
        keys = noise_keys(1234 + seed, 7)
        reference = reference_update(param, direction, coef, 0.999)
        eager = param.cpu().clone()
        apply_update_(param, direction, coef, decay=0.999, rounding="stochastic", keys=keys)
        apply_update_(
            eager,
            direction.cpu(),
            coef.cpu() if isinstance(coef, torch.Tensor) else coef,
            decay=0.999,
            rounding="stochastic",
            keys=keys,
        )
        out[f"sr_update_{name}"] = _result(
            relative_error(param, reference), "bf16", same_bits_as_eager=bool(torch.equal(param.cpu(), eager))
        )
    # An update 2^-12 of the weight: round-to-nearest would drop all of it; stochastic rounding keeps it
    # in expectation. Positive weights and updates, so the sums do not cancel.
    param = (torch.rand(m, n, device=device) * 0.02 + 0.01).to(torch.bfloat16)
    before = param.double()
    direction = param.float() * 2.0**-12
    apply_update_(param, direction, 1.0, decay=1.0, rounding="stochastic", keys=noise_keys(99, 1))
    kept = float((before - param.double()).sum() / direction.double().sum())
    out["sr_small_update_kept"] = {"fraction_kept": kept, "ok": bool(abs(kept - 1.0) < 0.05)}
    return out


def check_apollo(device: torch.device) -> dict[str, Any]:
    """`hogwild.optim.Apollo` (its fast path on this device) vs the paper's update in float64, 3 steps."""
    from hogwild.optim import Apollo

    out: dict[str, Any] = {}
    cases = [("fp32", torch.float32, 1e-3), ("bf16", torch.bfloat16, 5e-2)]
    for band, dtype, lr in cases:
        for shape in ((1536, 8960), (8960, 1536)):
            settings = ApolloSettings(lr=lr)
            params = [
                torch.nn.Parameter((torch.randn(shape, device=device) * 0.02).to(dtype)) for _ in range(2)
            ]
            start = [p.detach().clone() for p in params]
            optimizer = Apollo(params, lr=lr)
            grads: list[list[torch.Tensor]] = [[], []]
            for _ in range(3):
                for i, p in enumerate(params):
                    p.grad = (torch.randn(shape, device=device) * 1e-3).to(dtype)
                    grads[i].append(p.grad.clone())
                optimizer.step()
            errors = []
            for p, w0, g in zip(params, start, grads, strict=True):
                ref = reference_apollo(w0, g, optimizer.state[p]["seed"], settings)
                errors.append(relative_error(p.detach().double() - w0.double(), ref - w0.double()))
            worst = max(errors) if all(not math.isnan(e) for e in errors) else math.nan
            out[f"apollo_{band}_{shape[0]}x{shape[1]}"] = _result(worst, band)
    return out


def _small_qwen2(device: torch.device) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False,
        use_cache=False,
    )  # fmt: skip
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float64)


def _loss_and_grads(model: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float()
        if logits.dtype != torch.float64
        else logits[:, :-1].flatten(0, 1),
        ids[:, 1:].flatten(),
    )
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return float(loss.detach()), grads


def check_training_step(device: torch.device, compile_layers: bool) -> dict[str, Any]:
    """Loss and gradients of a bf16 Qwen2 (eager, and with compiled layers) vs the same weights in float64."""
    from hogwild.worker.protection import decoder_layers

    reference = _small_qwen2(device)
    reference.train()
    fast = _small_qwen2(device)
    fast.load_state_dict(reference.state_dict())
    fast = fast.to(torch.bfloat16)
    # The reference computes with exactly the bf16 weights, so only the arithmetic differs.
    reference.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    fast.train()
    ids = torch.randint(0, 8192, (2, 512), device=device)
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    out: dict[str, Any] = {}
    variants = [("eager", False), ("compiled", True)] if compile_layers else [("eager", False)]
    for name, compiled in variants:
        if compiled:
            for layer in decoder_layers(fast):
                layer.compile()
        loss, grads = _loss_and_grads(fast, ids)
        out[f"train_step_{name}_loss"] = _result(abs(loss - ref_loss) / abs(ref_loss), "bf16")
        out[f"train_step_{name}_grads"] = _result(relative_error(grads, ref_grads), "bf16")
    return out


def run_checks(device: torch.device, compile_layers: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results.update(check_rounding(device))
    results.update(check_apollo(device))
    results.update(check_training_step(device, compile_layers))
    return results
