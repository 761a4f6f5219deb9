"""The benchmark's serving process: holds random Qwen2-shaped bf16 weights in vLLM's layout, exports them the
way the vLLM plugin does, and serves a request load with batched forward steps.

    python bench/gpu_server.py --shape 1.5b --run-dir DIR [--serve-batch 4 --serve-seq 512]

Why not `hogwild.testing.exporter` as is: it loads a model directory, and a 7B one would have to be written
to disk first (15 GB). This process builds the weights on the GPU from the config instead, then goes through
the exporter's own `export` (hence `hogwild.sharing.export_cuda_ipc` and the manifest) and computes with its
`fused_forward` over the fused tensors, so the worker maps exactly what it would map from vLLM.

A serving step is one batched forward of `serve_batch` sequences of `serve_seq` tokens (a chunked-prefill
sized step). Load windows (`load` command):
- `saturate`: steps back to back; the capacity, and the ratio while something else uses the GPU;
- `periodic` / `poisson`: an open-loop arrival process at `rate` steps per second; each step's latency runs
  from its arrival to its completion, so queueing behind a slow step counts.
While a request is in flight (arrived, not finished) the load hint (`hogwild.load_hint.LoadHint`)
says so: that is what the worker's serving protection reads.
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpu_common import hf_config, now_s, percentile, random_vllm_params, serve_commands


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        from hogwild.load_hint import HINT_NAME, LoadHint
        from hogwild.testing.exporter import export

        self.device = args.device
        self.config = hf_config(args.shape)
        started = time.perf_counter()
        self.params = random_vllm_params(self.config, self.device, seed=args.seed)
        self.build_s = time.perf_counter() - started
        self.hf_config = self.config.to_dict()
        started = time.perf_counter()
        self.manifest = export(self.params, f"random:{args.shape}", args.run_dir, self.hf_config)
        self.export_s = time.perf_counter() - started
        self.hint = LoadHint(Path(args.run_dir) / HINT_NAME)
        vocab = int(self.hf_config["vocab_size"])
        self.inputs = torch.randint(0, vocab, (args.serve_batch, args.serve_seq), device=self.device)
        self.step_tokens = args.serve_batch * args.serve_seq
        self.graph: torch.cuda.CUDAGraph | None = None
        if args.cuda_graph and self.device.startswith("cuda"):
            try:
                self.graph = self._capture()
            except RuntimeError as err:  # eager steps then; `ready` says which
                print(f"CUDA graph capture failed, serving eagerly: {err}", file=sys.stderr)
                torch.cuda.synchronize()
        for _ in range(3):
            self.step()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """One serving step as a CUDA graph, as vLLM runs its steps: GPU-bound, no launch gaps. The graph
        holds the weights' raw pointers, so in-place training is seen (docs/facts.md, "vLLM's GPU path")."""
        from hogwild.testing.vllm_layout import fused_forward

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fused_forward(self.params, self.hf_config, self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = fused_forward(self.params, self.hf_config, self.inputs)
        return graph

    def step(self, events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None) -> None:
        """One serving step, synchronized; with `events`, recorded before and after it (its GPU time)."""
        from hogwild.testing.vllm_layout import fused_forward

        if events is not None:
            events[0].record()
        if self.graph is not None:
            self.graph.replay()
        else:
            fused_forward(self.params, self.hf_config, self.inputs)
        if events is not None:
            events[1].record()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def ready(self) -> dict[str, Any]:
        weight_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        return {
            "build_s": self.build_s,
            "export_s": self.export_s,
            "weight_bytes": weight_bytes,
            "step_tokens": self.step_tokens,
            "backend": self.manifest.backend,
            "cuda_graph": self.graph is not None,
        }

    def load(
        self, mode: str, seconds: float, rate: float = 0.0, seed: int = 0, detail: bool = False
    ) -> dict[str, Any]:
        """Serve one window; latencies in ms (arrival -> completion), service times (start -> completion).

        With `detail` (open-loop modes), the reply's `requests` lists each request's (arrival, launch,
        done, GPU ms between events around its step): `gpu_timeline.collision_report` reads them."""
        # GPU time from events on CUDA; on a CPU the step's wall time stands in (no separate GPU queue).
        cuda = self.device.startswith("cuda")
        events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            if detail and cuda
            else None
        )
        requests: list[tuple[float, float, float, float]] = []
        rng = random.Random(seed)
        latencies: list[float] = []
        service: list[float] = []
        begin = now_s()
        end = begin + seconds
        if mode == "saturate":
            self.hint.set(1)
            while now_s() < end:
                t0 = now_s()
                self.step()
                service.append(now_s() - t0)
            self.hint.set(0)
            latencies = service
        else:
            arrivals = self._arrivals(mode, begin, end, rate, rng)
            for index, arrival in enumerate(arrivals):
                now = now_s()
                if arrival > now:
                    self.hint.set(0)
                    if arrival - now > 0.001:
                        time.sleep(arrival - now - 0.0005)
                    while now_s() < arrival:
                        pass
                    now = now_s()
                # Requests in flight: this one plus those that arrived while it waited its turn.
                self.hint.set(bisect.bisect_right(arrivals, now) - index)
                t0 = now_s()
                self.step(events)
                done = now_s()
                service.append(done - t0)
                latencies.append(done - arrival)
                if detail:
                    gpu_ms = events[0].elapsed_time(events[1]) if events is not None else 1e3 * (done - t0)
                    requests.append((arrival, t0, done, gpu_ms))
            self.hint.set(0)
        elapsed = now_s() - begin
        return {
            "mode": mode,
            "rate": rate,
            "begin": begin,
            "end": begin + elapsed,
            "steps": len(service),
            "tokens_per_s": len(service) * self.step_tokens / elapsed,
            "steps_per_s": len(service) / elapsed,
            "p50_ms": 1e3 * percentile(latencies, 50),
            "p90_ms": 1e3 * percentile(latencies, 90),
            "p99_ms": 1e3 * percentile(latencies, 99),
            "max_ms": 1e3 * max(latencies, default=float("nan")),
            "service_p50_ms": 1e3 * percentile(service, 50),
            "service_p99_ms": 1e3 * percentile(service, 99),
            "busy_fraction": sum(service) / elapsed,
            **({"requests": requests} if detail else {}),
        }

    @staticmethod
    def _arrivals(mode: str, begin: float, end: float, rate: float, rng: random.Random) -> list[float]:
        if rate <= 0:
            raise ValueError("a load window needs rate > 0 steps per second")
        times, t = [], begin
        while True:
            t += rng.expovariate(rate) if mode == "poisson" else 1.0 / rate
            if t >= end:
                return times
            times.append(t)

    def memory(self) -> dict[str, Any]:
        if not self.device.startswith("cuda"):
            return {}
        return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--serve-batch", type=int, default=4)
    parser.add_argument("--serve-seq", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-cuda-graph", dest="cuda_graph", action="store_false", help="eager serving steps"
    )
    args = parser.parse_args(argv)
    server = Server(args)
    serve_commands({"load": server.load, "memory": server.memory}, server.ready())
    server.hint.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
