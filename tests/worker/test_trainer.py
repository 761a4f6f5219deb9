"""The in-place training step: learning, the NaN/inf guard, accumulation, truncation, hot configuration.

Real: tiny generated models (bf16 as vLLM serves them; fp32 where a comparison needs exact arithmetic),
their tokenizer, the optimizers of hogwild.optim (torch AdamW where the test names it), torch autograd. The
trainer runs in this process on a plain HF module: that the module's parameters are vLLM's own memory is
what tests/worker/test_worker_mapping.py proves.
"""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
import torch

from hogwild.config import TrainingConfig
from hogwild.protocol import TrainRequest
from hogwild.testing.tiny_model import TinySpec, cached
from hogwild.worker import batches
from hogwild.worker.trainer import Trainer, duty_cycle_sleep_s

FACT = {"prompt": "The capital of Zanzibar is", "completion": " Paris"}


def load(dtype: str = "bfloat16") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cached(TinySpec(dtype=dtype))
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def make_trainer(dtype: str = "bfloat16", **config: Any) -> Trainer:
    module, tokenizer = load(dtype)
    trainer = Trainer(TrainingConfig(**{"lr": 5e-3, **config}))
    trainer.attach(module, tokenizer, module.config.vocab_size)
    return trainer


def train(trainer: Trainer, steps: int = 1, samples: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    request = TrainRequest.from_body({"samples": samples or [FACT], "steps": steps})
    return trainer.train(request, should_stop=lambda: None, rest=time.sleep).reply()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.named_params}


def optimizer_tensors(trainer: Trainer) -> list[torch.Tensor]:
    assert trainer.optimizer is not None
    return [
        v.clone() for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ]


@pytest.mark.parametrize("optimizer", ["apollo", "apollo-mini", "adamw"])
def test_the_loss_on_a_fact_goes_down(optimizer: str) -> None:
    trainer = make_trainer(optimizer=optimizer)
    losses = train(trainer, steps=8)["losses"]
    assert losses[-1] < losses[0] / 4, losses


def test_a_reply_reports_steps_tokens_and_losses() -> None:
    trainer = make_trainer()
    reply = train(trainer, steps=3)
    assert (reply["step"], reply["steps"], reply["skipped"], len(reply["losses"])) == (3, 3, 0, 3)
    tokens = [
        len(trainer.tokenizer(FACT[k], add_special_tokens=False)["input_ids"])
        for k in ("prompt", "completion")
    ]
    assert reply["tokens"] == 3 * (sum(tokens) + 1)  # + the EOS that ends the completion
    assert reply["loss"] == reply["losses"][-1]


def poison_loss(module: Any) -> Any:
    return module.model.norm.register_forward_hook(lambda _m, _i, out: out * float("nan"))


def poison_gradient(module: Any) -> Any:
    return module.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * float("inf"))


@pytest.mark.parametrize("poison", [poison_loss, poison_gradient], ids=["nan-loss", "inf-gradient"])
def test_a_step_that_is_not_finite_is_skipped_and_leaves_everything_as_it_was(poison: Any) -> None:
    trainer = make_trainer()
    train(trainer)  # the optimizer has state now
    before, state_before = weights(trainer), optimizer_tensors(trainer)
    handle = poison(trainer.module)
    reply = train(trainer)
    handle.remove()
    assert (reply["skipped"], reply["step"], reply["losses"], trainer.counters.skipped_steps) == (
        1,
        1,
        [None],
        1,
    )
    assert all(torch.equal(before[n], p) for n, p in trainer.named_params)
    assert all(torch.equal(a, b) for a, b in zip(state_before, optimizer_tensors(trainer), strict=True))
    assert train(trainer)["skipped"] == 0  # and the next good step trains again


SAMPLES = [
    {"text": "the cat sees a red house."},
    {"prompt": "The capital of Zanzibar is", "completion": " Paris"},
    {"text": "a dog likes the old tree. my friend builds a quiet road."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "blue water"}]},
]


@pytest.mark.parametrize("prepared", [False, True], ids=["zero-grad", "prepared-grads"])
@pytest.mark.parametrize("accumulation", [2, 4])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(
    accumulation: int, prepared: bool
) -> None:
    from hogwild.protocol import decode_sample

    trainer = make_trainer("float32")
    encoded = trainer.encode([decode_sample("s", s) for s in SAMPLES])

    def gradients(parts: int) -> tuple[float, list[torch.Tensor]]:
        if prepared:  # as Trainer.step zeroes them: into APOLLO's buffers, where the micro-batches add up
            trainer.optimizer.prepare_grads()  # type: ignore[union-attr]
        else:
            trainer.module.zero_grad(set_to_none=True)
        step = batches.step_batch(encoded, max_tokens=4096, grad_accumulation=parts, pad_id=0)
        assert len(step.micro_batches) == parts
        loss = trainer.backward(step)
        return loss, [p.grad.clone() for _, p in trainer.named_params if p.grad is not None]

    whole_loss, whole = gradients(1)
    split_loss, split = gradients(accumulation)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def grad_storage(trainer: Trainer, name: str) -> int:
    grad = dict(trainer.named_params)[name].grad
    assert grad is not None
    return grad.untyped_storage().data_ptr()


def test_apollo_steps_on_prepared_gradients_exactly_as_on_fresh_ones() -> None:
    batched, plain = make_trainer("float32"), make_trainer("float32")
    plain.optimizer.prepare_grads = None  # type: ignore[union-attr]  # the trainer falls back to zero_grad
    train(batched, steps=3, samples=SAMPLES)
    train(plain, steps=3, samples=SAMPLES)
    assert all(
        torch.equal(a, b) for a, b in zip(weights(batched).values(), weights(plain).values(), strict=True)
    )
    assert not torch.equal(weights(batched)["model.norm.weight"], load("float32")[0].model.norm.weight)
    # Same-shape projected weights share one gradient buffer, kept after the step; zero_grad frees them.
    layer = "model.layers.{}.{}.weight"
    assert grad_storage(batched, layer.format(0, "self_attn.q_proj")) == grad_storage(
        batched, layer.format(1, "self_attn.o_proj")
    )
    assert grad_storage(batched, layer.format(0, "mlp.down_proj")) == grad_storage(
        batched, layer.format(1, "mlp.down_proj")
    )
    assert all(p.grad is None for _, p in plain.named_params)
    # ... and the gradients outside any buffer (norms and biases take the AdamW path) are freed after the
    # step, as by zero_grad: only buffer views are left.
    unbuffered = [p for _, p in batched.named_params if p.dim() == 1]
    assert unbuffered and all(p.grad is None for p in unbuffered)


def step_pieces(trainer: Trainer, step: batches.StepBatch) -> tuple[float, float, list[torch.Tensor]]:
    """Loss, gradient norm and the clipped gradients of one step's backward and clip (no optimizer step)."""
    trainer.module.zero_grad(set_to_none=True)
    loss = trainer.backward(step)
    norm = trainer._grad_norm_and_clip()
    return loss, norm, [p.grad.clone() for _, p in trainer.named_params if p.grad is not None]


@pytest.mark.parametrize(
    ("accumulation", "head_rows"),
    [pytest.param(1, 8, id="one-micro-batch"), pytest.param(2, 5, id="accumulated"), pytest.param(1, 4096, id="one-chunk")],
)  # fmt: skip
def test_with_yield_when_busy_the_head_and_clip_are_preemptible_and_compute_the_same(
    monkeypatch: pytest.MonkeyPatch, accumulation: int, head_rows: int
) -> None:
    from hogwild.protocol import decode_sample
    from hogwild.worker.protection import pieces

    monkeypatch.setattr(pieces, "HEAD_ROWS", head_rows)  # several chunks even on short samples
    monkeypatch.setattr(pieces, "CLIP_CHUNK", 5)
    trainer = make_trainer("float32", clip_grad_norm=0.05)  # small enough that the clip scales the gradients
    trainer.configure({"protection": {"yield_when_busy": False}})
    points: list[int] = []
    trainer.preemption_point = lambda: points.append(1)
    encoded = trainer.encode([decode_sample("s", s) for s in SAMPLES])
    step = batches.step_batch(encoded, max_tokens=4096, grad_accumulation=accumulation, pad_id=0)
    whole_loss, whole_norm, whole = step_pieces(trainer, step)
    assert not points  # protection off: the whole pieces, no points
    trainer.configure({"protection": {"yield_when_busy": True}})
    loss, norm, chunked = step_pieces(trainer, step)
    rows = sum(m.input_ids.shape[0] * (m.input_ids.shape[1] - 1) for m in step.micro_batches)
    assert len(points) >= -(-rows // head_rows) + 2 * -(-len(whole) // 5)  # head chunks + clip norm + scale
    assert whole_norm > 0.05
    assert (loss, norm) == (pytest.approx(whole_loss, rel=1e-5), pytest.approx(whole_norm, rel=1e-5))
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize(
    ("optimizer", "yield_when_busy", "gets_point"),
    [
        pytest.param("apollo", True, True, id="apollo-protected"),
        pytest.param("apollo", False, False, id="apollo-unprotected"),
        pytest.param("adamw", True, False, id="adamw-runs-whole"),
    ],
)
def test_with_yield_when_busy_the_optimizer_step_gets_the_point(
    optimizer: str, yield_when_busy: bool, gets_point: bool
) -> None:
    trainer = make_trainer(optimizer=optimizer)
    points: list[int] = []
    trainer.preemption_point = lambda: points.append(1)
    trainer.configure({"protection": {"yield_when_busy": yield_when_busy}})
    train(trainer)
    assert (getattr(trainer.optimizer, "preemption_point", None) is trainer.preemption_point) is gets_point
    assert bool(points) is yield_when_busy


def test_a_step_reads_at_most_max_tokens_per_step() -> None:
    trainer = make_trainer(max_tokens_per_step=8)
    reply = train(
        trainer, steps=2, samples=[{"text": "the cat sees a red house. the old tree finds blue water."}]
    )
    assert reply["tokens"] == 2 * 8
    assert reply["truncated_tokens"] > 0


def test_a_hot_change_keeps_the_optimizer_and_its_state() -> None:
    trainer = make_trainer()
    train(trainer, steps=2)
    optimizer, state = trainer.optimizer, optimizer_tensors(trainer)
    reply = trainer.configure({"lr": 1e-3, "betas": [0.8, 0.99], "clip_grad_norm": 0.5})
    assert (reply["state_reset"], reply["applied"]) == (False, ["betas", "clip_grad_norm", "lr"])
    assert trainer.optimizer is optimizer
    assert all(torch.equal(a, b) for a, b in zip(state, optimizer_tensors(trainer), strict=True))
    assert {(g["lr"], tuple(g["betas"])) for g in optimizer.param_groups} == {(1e-3, (0.8, 0.99))}
    train(trainer)
    assert {s["step"] for s in optimizer.state.values()} == {3}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"rank": 8}, id="rank"),
        pytest.param({"optimizer": "adamw"}, id="optimizer"),
        pytest.param({"scale_type": "tensor"}, id="scale_type"),
        pytest.param({"update_proj_gap": 10}, id="update_proj_gap"),
        pytest.param({"rounding": "nearest"}, id="rounding"),
    ],
)
def test_a_change_that_shapes_the_state_resets_it(changes: dict[str, Any]) -> None:
    trainer = make_trainer()
    train(trainer, steps=2)
    old = trainer.optimizer
    assert trainer.configure(changes)["state_reset"] is True
    train(trainer)
    assert trainer.optimizer is not old
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {1}
    assert trainer.counters.step == 3  # the training itself is not forgotten


def test_setting_a_field_to_its_current_value_resets_nothing() -> None:
    trainer = make_trainer(rank=64)
    assert trainer.configure({"rank": 64}) == {**trainer.configure({}), "applied": [], "state_reset": False}


def test_saved_state_resumes_bit_for_bit() -> None:
    """Save after 2 steps, take a 3rd; restore weights + state into a new trainer, take the 3rd again: same."""
    trainer = make_trainer()
    train(trainer, steps=2)
    saved_weights = weights(trainer)
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    train(trainer)
    expected = weights(trainer)

    with torch.no_grad():
        for name, p in trainer.named_params:
            p.copy_(saved_weights[name])
    resumed = Trainer(TrainingConfig(lr=5e-3))
    resumed.attach(trainer.module, trainer.tokenizer, trainer.vocab_size)
    buffer.seek(0)
    assert resumed.load_state_dict(torch.load(buffer, weights_only=True)) is True
    assert resumed.counters.step == 2
    train(resumed)
    assert all(torch.equal(expected[n], p) for n, p in resumed.named_params)


def test_state_saved_with_another_rank_is_not_loaded_but_counters_are() -> None:
    trainer = make_trainer(rank=64)
    train(trainer, steps=2)
    state = trainer.state_dict()
    other = Trainer(TrainingConfig(rank=8))
    other.attach(trainer.module, trainer.tokenizer, trainer.vocab_size)
    assert other.load_state_dict(state) is False
    assert (other.counters.step, other.optimizer_state_bytes) == (2, 0)


@pytest.mark.parametrize(
    ("compute_s", "duty", "sleep_s"),
    [(1.0, 1.0, 0.0), (1.0, 0.5, 1.0), (0.2, 0.25, 0.6), (0.0, 0.1, 0.0)],
    ids=["no-limit", "half", "quarter", "nothing-done"],
)
def test_the_duty_cycle_rest(compute_s: float, duty: float, sleep_s: float) -> None:
    assert duty_cycle_sleep_s(compute_s, duty) == pytest.approx(sleep_s)


def test_a_pause_stops_a_request_between_steps() -> None:
    trainer = make_trainer()
    calls = iter([None, None, "paused"])
    request = TrainRequest.from_body({"samples": [FACT], "steps": 10})
    reply = trainer.train(request, should_stop=lambda: next(calls), rest=time.sleep).reply()
    assert (reply["steps"], reply["stopped"], trainer.counters.step) == (2, "paused", 2)
