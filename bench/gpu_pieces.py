"""Two small GPU measurements behind serving protection's design (not part of the results table).

1. `pieces`: forward + backward of one 7B MLP (gate, up, down at 4096 tokens, bf16) with torch's `F.linear`
   against `preemptible_linear`'s pieces (a no-op point), and against pieces without the autograd Function
   (plain row-block matmuls), so a slowdown can be pinned on the matmul shapes or on the Function.
2. `blocked`: does a process whose stream is held at a `cuStreamWaitValue32` (worker/protection/device.py) slow another
   process's GPU work? A child holds its stream on a busy hint; this process times bf16 matmuls alone, then
   while the child is held, then after it is released.

    PYTHONPATH=operator:bench python bench/gpu_pieces.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpu_common import log


def _time_ms(fn: Any, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def pieces() -> dict[str, float]:
    from hogwild.worker.protection import preemptible_linear

    hidden, inter, tokens = 3584, 18944, 4096
    torch.manual_seed(0)
    layers = [
        torch.nn.Linear(hidden, inter, bias=False, dtype=torch.bfloat16, device="cuda"),
        torch.nn.Linear(hidden, inter, bias=False, dtype=torch.bfloat16, device="cuda"),
        torch.nn.Linear(inter, hidden, bias=False, dtype=torch.bfloat16, device="cuda"),
    ]
    x = torch.randn(2, tokens // 2, hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    upstream = torch.randn(2, tokens // 2, hidden, dtype=torch.bfloat16, device="cuda")

    def mlp(forward: list[Any]) -> None:
        for layer in layers:
            layer.weight.grad = None
        gate, up, down = forward
        out = down(F.silu(gate(x)) * up(x))
        out.backward(upstream)

    native = [lambda t, layer=layer: F.linear(t, layer.weight) for layer in layers]
    piecewise = [preemptible_linear.piecewise_forward(layer, lambda: None) for layer in layers]
    figures = {
        "native_ms": _time_ms(lambda: mlp(native)),
        "pieces_ms": _time_ms(lambda: mlp(piecewise)),
    }
    # The same matmuls without autograd: the forward's three row blocks against one matmul.
    flat = x.detach().reshape(-1, hidden)
    weight = layers[0].weight.detach()
    out = torch.empty(tokens, inter, dtype=torch.bfloat16, device="cuda")
    figures["one_matmul_ms"] = _time_ms(lambda: torch.mm(flat, weight.t(), out=out))
    figures["three_blocks_ms"] = _time_ms(
        lambda: preemptible_linear.matmul_in_pieces(flat, weight.t(), out, lambda: None)
    )
    grad = torch.randn(tokens, inter, dtype=torch.bfloat16, device="cuda")
    grad_w = torch.empty_like(weight)
    figures["weight_grad_one_ms"] = _time_ms(lambda: torch.mm(grad.t(), flat, out=grad_w))
    figures["weight_grad_blocks_ms"] = _time_ms(
        lambda: preemptible_linear.matmul_in_pieces(grad.t(), flat, grad_w, lambda: None)
    )
    return figures


CHILD = """
import sys, time, torch
from pathlib import Path
from hogwild.config import ServingProtection
from hogwild.worker.protection.device import try_device_gate
from hogwild.worker.protection import GateStats
torch.zeros(1, device="cuda")
device = try_device_gate(Path(sys.argv[1]), ServingProtection(), GateStats())
assert device is not None
big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
device.wait_here()
for _ in range(50):
    big = big @ big.t() * 1e-4
print("held", flush=True)
sys.stdin.readline()
device.close(torch.cuda.synchronize)
print("released", flush=True)
"""


def blocked(run_dir: Path) -> dict[str, float]:
    from hogwild.load_hint import HINT_NAME, LoadHint

    hint = LoadHint(run_dir / HINT_NAME)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def work() -> None:
        for _ in range(10):
            torch.mm(a, a)

    figures = {"alone_ms": _time_ms(work)}
    hint.set(1)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run_dir / HINT_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "held"
    time.sleep(0.5)
    figures["beside_held_stream_ms"] = _time_ms(work)
    hint.set(0)
    child.stdin.write("\n")
    child.stdin.flush()
    figures["child_released"] = float(child.stdout.readline().strip() == "released")
    child.wait(60)
    figures["alone_again_ms"] = _time_ms(work)
    hint.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = Path("/dev/shm") / "hogwild-pieces"
    run_dir.mkdir(exist_ok=True)
    results = {"pieces": pieces(), "blocked": blocked(run_dir)}
    (args.out / "gpu_pieces.json").write_text(json.dumps(results, indent=1))
    log(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
