"""Samples -> token batches: what the model reads, and which positions the loss falls on.

Pure: a tokenizer goes in (it is only called), tensors come out; no I/O, no model.

- text: loss on every token;
- prompt + completion: loss on the completion only; the completion ends with the tokenizer's EOS so the
  model also learns to stop there;
- chat messages: rendered by the model's own chat template, loss on assistant turns only (the template's
  `{% generation %}` markers via `return_assistant_tokens_mask`; for a template without them, the assistant
  spans are found by rendering the conversation turn by turn);
- token ids with labels (HF convention: labels[i] is the target at position i, -100 = no loss).

Labels are not shifted here; the trainer predicts labels[i + 1] from input_ids[: i + 1]. A sample longer
than the model's positions (`max_position_embeddings`) is cut to them: positions the model does not have are
never trained, and the cut tokens are counted in `truncated_tokens` like any other. One optimizer step
reads at most `max_tokens_per_step` tokens (samples are kept in order, the one that crosses the budget is cut,
the rest wait for nothing: they are dropped and counted), split into `grad_accumulation` micro-batches that
are right-padded (labels -100 and attention 0 on padding).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hogwild.protocol import ProtocolError, Sample
from hogwild.worker.group.plan import shard_bounds

IGNORE = -100
_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Encoded:
    """One tokenized sample. `labels` aligned with `input_ids` (not shifted), IGNORE where no loss."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def targets(self) -> int:
        """Positions that produce a loss term (a label at position 0 has no prefix to predict it from)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [batch, seq] long
    labels: torch.Tensor  # [batch, seq] long, IGNORE off-target
    attention_mask: torch.Tensor  # [batch, seq] long

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class StepBatch:
    """Everything one optimizer step reads."""

    micro_batches: tuple[MicroBatch, ...]
    tokens: int  # real (non-padding) tokens
    targets: int  # loss terms over all micro-batches: the loss is their mean
    truncated_tokens: int  # cut off by the model's positions and by max_tokens_per_step


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def encode_text(tokenizer: Any, text: str) -> Encoded:
    ids = _ids(tokenizer, text, special=True)
    return Encoded(tuple(ids), tuple(ids))


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> Encoded:
    # Tokenized apart, so the boundary is exact: no prompt token ever carries completion loss.
    prompt_ids = _ids(tokenizer, prompt, special=True)
    completion_ids = _ids(tokenizer, completion, special=not prompt_ids)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(int(tokenizer.eos_token_id))
    ids = prompt_ids + completion_ids
    return Encoded(tuple(ids), tuple([IGNORE] * len(prompt_ids) + completion_ids))


def _render(tokenizer: Any, turns: Sequence[dict[str, str]], **kwargs: Any) -> Any:
    return tokenizer.apply_chat_template(list(turns), **kwargs)


def _assistant_mask_by_rendering(
    tokenizer: Any, turns: Sequence[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """For templates without `{% generation %}`: each assistant turn's text is what rendering it adds."""
    full = _render(tokenizer, turns, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], tokenize=False, add_generation_prompt=True) if i else ""
        after = _render(tokenizer, turns[: i + 1], tokenize=False)
        if not full.startswith(after) or not after.startswith(before):
            raise ProtocolError("invalid", "the model's chat template does not render turns incrementally")
        # What follows the turn's end token is the template's separator, not the assistant's text.
        spans.append((len(before), len(after.rstrip())))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start and end <= e for s, e in spans)) for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def encode_messages(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> Encoded:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ProtocolError(
            "invalid", "this model has no chat template; send text or prompt/completion samples"
        )
    turns = [{"role": role, "content": content} for role, content in messages]
    ids: list[int] = []
    mask: list[int] = []
    if isinstance(template, str) and _GENERATION_MARK.search(template):
        out = _render(tokenizer, turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out.get("assistant_masks") or [])
    if not any(mask):
        ids, mask = _assistant_mask_by_rendering(tokenizer, turns)
    return Encoded(tuple(ids), tuple(t if m else IGNORE for t, m in zip(ids, mask, strict=True)))


def encode_tokens(sample: Sample, vocab_size: int) -> Encoded:
    for where, values in (("input_ids", sample.input_ids), ("labels", sample.labels)):
        bad = [v for v in values if not (0 <= v < vocab_size or (where == "labels" and v == IGNORE))]
        if bad:
            raise ProtocolError("invalid", f"{where} has ids outside [0, {vocab_size}): {bad[:5]}")
    return Encoded(sample.input_ids, sample.labels)


def encode_sample(tokenizer: Any, sample: Sample, vocab_size: int) -> Encoded:
    if sample.kind == "text":
        return encode_text(tokenizer, sample.text)
    if sample.kind == "prompt_completion":
        return encode_prompt_completion(tokenizer, sample.prompt, sample.completion)
    if sample.kind == "messages":
        return encode_messages(tokenizer, sample.messages)
    return encode_tokens(sample, vocab_size)


def truncate(encoded: Sequence[Encoded], max_tokens: int) -> tuple[list[Encoded], int]:
    """Keep samples in order within a token budget; cut the one that crosses it. Returns (kept, cut tokens)."""
    kept, budget, cut = [], max_tokens, 0
    for sample in encoded:
        take = min(len(sample.input_ids), budget)
        cut += len(sample.input_ids) - take
        if take >= 2:  # one token alone predicts nothing
            kept.append(Encoded(sample.input_ids[:take], sample.labels[:take]))
            budget -= take
        else:
            cut += take
    return kept, cut


def fit_positions(encoded: Sequence[Encoded], max_positions: int | None) -> tuple[list[Encoded], int]:
    """Cut every sample to the model's positions. Returns (samples, cut tokens); no limit when None."""
    if max_positions is None:
        return list(encoded), 0
    cut = sum(max(0, len(s.input_ids) - max_positions) for s in encoded)
    return [Encoded(s.input_ids[:max_positions], s.labels[:max_positions]) for s in encoded], cut


def split(encoded: Sequence[Encoded], parts: int) -> list[list[Encoded]]:
    """At most `parts` contiguous groups, as even in sample count as possible (none empty)."""
    parts = max(1, min(parts, len(encoded)))
    size, extra = divmod(len(encoded), parts)
    groups, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        groups.append(list(encoded[start:stop]))
        start = stop
    return groups


def pad(group: Sequence[Encoded], pad_id: int) -> MicroBatch:
    length = max(len(s.input_ids) for s in group)
    ids = torch.full((len(group), length), pad_id, dtype=torch.long)
    labels = torch.full((len(group), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(group), length), dtype=torch.long)
    for row, sample in enumerate(group):
        n = len(sample.input_ids)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        mask[row, :n] = 1
    return MicroBatch(ids, labels, mask)


def step_batch(
    encoded: Sequence[Encoded],
    *,
    max_tokens: int,
    grad_accumulation: int,
    pad_id: int,
    max_positions: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> StepBatch:
    """The micro-batches of one optimizer step. Raises ProtocolError when nothing is left to learn.

    `shard` = (rank, size): in a replica group each rank takes its contiguous share of the kept samples, while
    `targets` stays the count over ALL of them, so the gradients the ranks all-reduce (sum) are those of the
    one big batch. A rank with no share gets no micro-batches. Truncation runs before the split, so every
    rank keeps the same samples a lone worker would."""
    fitted, beyond = fit_positions(encoded, max_positions)
    kept, cut = truncate(fitted, max_tokens)
    cut += beyond
    targets = sum(s.targets for s in kept)
    if targets == 0:
        raise ProtocolError(
            "invalid",
            "no tokens to learn from"
            + (f" after truncation to max_tokens_per_step={max_tokens}" if cut else " (every label is -100)"),
        )
    start, stop = shard_bounds(len(kept), *shard)
    mine = kept[start:stop]
    micro = tuple(pad(group, pad_id) for group in split(mine, grad_accumulation)) if mine else ()
    return StepBatch(micro, sum(len(s.input_ids) for s in mine), targets, cut)


def pad_id_of(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
