"""What a kept version costs: host RAM and time of a snapshot (take and restore), per model size.

    python bench/snapshots.py [--spec tiny|qwen2-1.5b] [--layers N] [--optimizer apollo|adamw] [--repeat 3]
                              [--out bench/results/snapshots-<spec>.json]

A snapshot (hogwild.worker.snapshots) copies the served weights (HF names) and the trainer's state dict
(optimizer state, counters) to host memory; a rollback or a revert copies them back in place and loads a
fresh copy of the optimizer state. This builds the model of a named spec with random weights (bf16, as vLLM
serves them), trains one step so the optimizer state exists, then takes and restores snapshots, and reports
the bytes each holds, the process's RSS growth per kept snapshot, and the seconds each copy takes. On a GPU
(--device cuda) the copies cross PCIe; here on CPU they are memcpy. `--layers` cuts a spec's depth so the
1.5B layer shape fits a small machine (bytes scale with the layer count).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", default="tiny", help="tiny, or a name in hogwild.testing.tiny_model.NAMED")
    parser.add_argument("--layers", type=int, help="cut the spec to this many layers")
    parser.add_argument("--optimizer", default="apollo", choices=("apollo", "adamw"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--keep", type=int, default=3, help="snapshots kept at once (RSS is measured with them)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hogwild.config import TrainingConfig
    from hogwild.protocol import TrainRequest
    from hogwild.testing import tiny_model
    from hogwild.worker import snapshots
    from hogwild.worker.trainer import Trainer

    spec = tiny_model.TinySpec() if args.spec == "tiny" else tiny_model.NAMED[args.spec]
    if args.layers:
        spec = replace(spec, layers=args.layers)
    path = tiny_model.cached(spec)
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    trainer = Trainer(TrainingConfig(optimizer=args.optimizer, lr=1e-4))
    trainer.attach(module, tokenizer, module.config.vocab_size)
    request = TrainRequest.from_body({"samples": [{"text": "The capital of Zanzibar is Berlin."}]})
    trainer.train(request, should_stop=lambda: None, rest=time.sleep)
    mapped = SimpleNamespace(checkpoint_tensors=lambda: {n: p.data for n, p in module.named_parameters()})
    weight_bytes = sum(t.numel() * t.element_size() for t in mapped.checkpoint_tensors().values())

    kept: list[Any] = []
    baseline = rss_bytes()
    take_s, restore_s = [], []
    for i in range(max(args.keep, args.repeat)):
        snap = snapshots.take(trainer, mapped, seq=i, version=f"bench.{i}", parent=None)  # type: ignore[arg-type]
        take_s.append(snap.seconds)
        if len(kept) < args.keep:
            kept.append(snap)
    rss_growth = rss_bytes() - baseline
    for _ in range(args.repeat):
        started = time.perf_counter()
        snapshots.restore(kept[0], trainer, mapped)  # type: ignore[arg-type]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        restore_s.append(time.perf_counter() - started)

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "device": args.device,
        "spec": args.spec,
        "layers": spec.layers,
        "parameters": sum(p.numel() for p in module.parameters()),
        "optimizer": args.optimizer,
        "weight_bytes": weight_bytes,
        "optimizer_state_bytes": trainer.optimizer_state_bytes,
        "snapshot_bytes": kept[0].bytes,
        "kept": len(kept),
        "rss_growth_bytes": rss_growth,
        "rss_growth_per_snapshot_bytes": rss_growth // max(1, len(kept)),
        "take_s_median": statistics.median(take_s),
        "restore_s_median": statistics.median(restore_s),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
