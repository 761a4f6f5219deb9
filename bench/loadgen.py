"""A streaming load generator for vLLM's OpenAI completions API: what serving looks like to its clients.

Open loop (Poisson arrivals at a rate) or closed loop (a fixed number of clients, each sending its next request
when the last one ends: the way to find capacity). Prompts are token ids (the API takes them), so their lengths
are exact and nothing is shared between them for the prefix cache; `ignore_eos` makes every output as long as
asked. Per request: TTFT (to the first streamed token), TPOT ((e2e - TTFT) / (tokens - 1): per request, since vLLM
merges tokens into one chunk when it falls behind, ITL per chunk understates it), the gaps between chunks, and
end-to-end latency; per window: percentiles and throughput.

Planning and summaries are pure (tests/benchmarks/test_loadgen.py); `run_load` does the HTTP, with aiohttp.

    python bench/loadgen.py --url http://127.0.0.1:8000 --model NAME --vocab 1024 --rate 20 --duration-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadSpec:
    duration_s: float
    vocab: int  # prompt token ids are drawn from [0, vocab)
    rate_per_s: float | None = None  # Poisson arrivals; None: closed loop
    concurrency: int = 64  # closed loop: the number of clients
    prompt_tokens: tuple[int, int] = (256, 2048)  # uniform, inclusive
    output_tokens: tuple[int, int] = (64, 512)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.vocab < 2 or self.concurrency < 1:
            raise ValueError("duration_s > 0, vocab >= 2 and concurrency >= 1 are needed")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive (or None for a closed loop)")
        for low, high in (self.prompt_tokens, self.output_tokens):
            if not 1 <= low <= high:
                raise ValueError("token ranges must be 1 <= low <= high")


@dataclass(frozen=True)
class Planned:
    at_s: float  # when to send, from the window's start (open loop; 0 in a closed loop)
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    sent_s: float  # from the window's start
    prompt_tokens: int
    max_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    chunk_gaps_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def one_request(spec: LoadSpec, rng: random.Random, at_s: float = 0.0) -> Planned:
    prompt = [rng.randrange(spec.vocab) for _ in range(rng.randint(*spec.prompt_tokens))]
    return Planned(at_s, prompt, rng.randint(*spec.output_tokens))


def poisson_plan(spec: LoadSpec) -> list[Planned]:
    """The open loop's requests: exponential gaps at `rate_per_s`, until `duration_s`."""
    assert spec.rate_per_s is not None
    rng = random.Random(spec.seed)
    plan, at = [], rng.expovariate(spec.rate_per_s)
    while at < spec.duration_s:
        plan.append(one_request(spec, rng, at))
        at += rng.expovariate(spec.rate_per_s)
    return plan


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else None,
    }


def summarize(results: Sequence[Result], elapsed_s: float) -> dict[str, Any]:
    """Latency percentiles (seconds) of the requests that finished, and throughput over `elapsed_s`."""
    done = [r for r in results if r.error is None and r.e2e_s is not None]
    return {
        "requests": len(results),
        "errors": len(results) - len(done),
        "first_error": next((r.error for r in results if r.error), None),
        "elapsed_s": elapsed_s,
        "requests_per_s": len(done) / elapsed_s if elapsed_s > 0 else 0.0,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / elapsed_s if elapsed_s > 0 else 0.0,
        "prompt_tokens_per_s": sum(r.prompt_tokens for r in done) / elapsed_s if elapsed_s > 0 else 0.0,
        "ttft_s": spread([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_s": spread([t for r in done if (t := r.tpot_s) is not None]),
        "itl_s": spread([g for r in done for g in r.chunk_gaps_s]),
        "e2e_s": spread([r.e2e_s for r in done if r.e2e_s is not None]),
    }


def parse_event(line: bytes) -> dict[str, Any] | None:
    """One server-sent event line of the stream: its JSON, or None (blank, comment, `[DONE]`)."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    if data == "[DONE]":
        return None
    parsed = json.loads(data)
    return parsed if isinstance(parsed, dict) else None


async def send(session: Any, url: str, model: str, planned: Planned, start: float) -> Result:
    """One streaming completion; latencies from the moment it is sent."""
    result = Result(time.monotonic() - start, len(planned.prompt), planned.max_tokens)
    body = {
        "model": model,
        "prompt": planned.prompt,
        "max_tokens": planned.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    last: float | None = None
    chunks = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                event = parse_event(line)
                if event is None:
                    continue
                now = time.monotonic()
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                # Any choice counts, empty text too: a token whose bytes the detokenizer holds back (part of
                # a UTF-8 character) streams as "" and was still generated (the tiny model's random output
                # can be all such tokens, which left TTFT unset).
                if event.get("choices"):
                    chunks += 1
                    if last is None:
                        result.ttft_s = now - sent
                    else:
                        result.chunk_gaps_s.append(now - last)
                    last = now
        result.e2e_s = time.monotonic() - sent
        if result.output_tokens == 0:
            result.output_tokens = chunks  # a server without usage in the stream: a lower bound
    except Exception as err:  # a failed request is a result too, never the end of the window
        result.error = f"{type(err).__name__}: {err}"
    return result


async def run_load(url: str, model: str, spec: LoadSpec, timeout_s: float = 600.0) -> dict[str, Any]:
    """One window: send for `duration_s`, then wait for what is in flight. Returns the summary and results."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        if spec.rate_per_s is not None:
            tasks = []
            for planned in poisson_plan(spec):
                delay = planned.at_s - (time.monotonic() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(session, url, model, planned, start)))
            results = list(await asyncio.gather(*tasks))
        else:
            rng = random.Random(spec.seed)
            results = []

            async def client() -> None:
                while time.monotonic() - start < spec.duration_s:
                    results.append(await send(session, url, model, one_request(spec, rng), start))

            await asyncio.gather(*(client() for _ in range(spec.concurrency)))
        elapsed = time.monotonic() - start
    summary = summarize(results, elapsed)
    summary["spec"] = asdict(spec)
    return {"summary": summary, "results": [asdict(r) | {"tpot_s": r.tpot_s} for r in results]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--vocab", type=int, required=True, help="prompt ids are drawn below this")
    parser.add_argument("--rate", type=float, help="requests per second (Poisson); omit for a closed loop")
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop: clients")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(256, 2048))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(64, 512))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the summary and every request's figures here (JSON)")
    args = parser.parse_args(argv)
    spec = LoadSpec(
        duration_s=args.duration_s,
        vocab=args.vocab,
        rate_per_s=args.rate,
        concurrency=args.concurrency,
        prompt_tokens=tuple(args.prompt_tokens),
        output_tokens=tuple(args.output_tokens),
        seed=args.seed,
    )
    window = asyncio.run(run_load(args.url, args.model, spec))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(window, f)
    print(json.dumps(window["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
