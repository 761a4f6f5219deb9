"""The evaluation gate's held-out set and its loss on the served weights.

The set comes from configure's `eval_samples` or from `gate.eval_file` (JSON lines, one /train sample per
line, on a volume the worker reads: the model's or the checkpoints'); the operator turns a ConfigMap into
`eval_samples`. It is kept in the run dir too, so a restarted worker gates with the same set.

The loss is the mean cross-entropy over the set's target tokens, with the same encoding and truncation as a
training step, without gradients. The caller holds the trainer's lock, so no step changes the weights
halfway through an evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hogwild import defaults
from hogwild.protocol import ProtocolError, Sample, decode_samples, encode_sample, parse_json, samples_digest
from hogwild.worker import batches

SAVED_NAME = "eval-set.json"


@dataclass(frozen=True)
class EvalSet:
    samples: tuple[Sample, ...]
    source: str  # "api", or the file it was read from

    def summary(self) -> dict[str, Any]:
        return {"samples": len(self.samples), "source": self.source, "digest": samples_digest(self.samples)}


def read_file(path: str) -> EvalSet:
    """JSON lines, one sample per line (blank lines skipped). Raises ProtocolError `invalid` when the file
    is missing, unreadable, malformed or holds no sample."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ProtocolError("invalid", f"gate.eval_file {path}: cannot read it ({err})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ProtocolError("invalid", f"gate.eval_file {path} holds no sample (an empty evaluation set)")
    values = [parse_json(line, f"{path} line {i + 1}") for i, line in enumerate(lines)]
    return EvalSet(decode_samples(f"{path}", values, limit=defaults.MAX_SAMPLES_PER_REQUEST), path)


def save(run_dir: Path, eval_set: EvalSet) -> None:
    target = run_dir / SAVED_NAME
    tmp = target.with_name(f".tmp-{SAVED_NAME}")
    body = {"source": eval_set.source, "samples": [encode_sample(s) for s in eval_set.samples]}
    tmp.write_text(json.dumps(body))
    os.replace(tmp, target)


def load_saved(run_dir: Path) -> EvalSet | None:
    try:
        body = parse_json((run_dir / SAVED_NAME).read_bytes(), SAVED_NAME)
        return EvalSet(decode_samples("eval set", body["samples"]), str(body.get("source", "api")))
    except (OSError, ProtocolError, KeyError, TypeError):
        return None


def held_out_loss(
    module: Any, tokenizer: Any, vocab_size: int, samples: Sequence[Sample], *, max_tokens: int, parts: int
) -> float:
    """Mean loss per target token of `samples` on the module's current weights (NaN when not finite).

    Raises ProtocolError `invalid` when the set has no target token left (every label -100, or truncated)."""
    encoded = [batches.encode_sample(tokenizer, s, vocab_size) for s in samples]
    positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    try:
        batch = batches.step_batch(
            encoded,
            max_tokens=max_tokens,
            grad_accumulation=parts,
            pad_id=batches.pad_id_of(tokenizer),
            max_positions=positions if isinstance(positions, int) and positions > 0 else None,
        )
    except ProtocolError as err:
        raise ProtocolError("invalid", f"evaluation set: {err.message}") from None
    device = next(module.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for micro in batch.micro_batches:
            ids, labels, mask = (t.to(device) for t in (micro.input_ids, micro.labels, micro.attention_mask))
            logits = module(input_ids=ids, attention_mask=mask).logits
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten(),
                ignore_index=batches.IGNORE,
                reduction="sum",
            ).double()
    loss = float(total) / batch.targets
    return loss if math.isfinite(loss) else math.nan
