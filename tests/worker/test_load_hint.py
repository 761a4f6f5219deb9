"""The serving-load middleware: counts OpenAI requests in flight for the trainer's serving protection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hogwild.load_hint import LoadHint
from hogwild.vllm_plugin.in_flight import ServingLoadMiddleware
from hogwild.worker.protection.probes import HintFileProbe


class Recorder:
    def __init__(self, hint: LoadHint, fail: bool = False) -> None:
        self.hint, self.fail, self.seen = hint, fail, -1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen = self.hint.active
        if self.fail:
            raise RuntimeError("handler crashed")


CASES = {
    "completions count": ("/v1/completions", 1),
    "chat counts": ("/v1/chat/completions", 1),
    "train does not count": ("/train", 0),
    "health does not count": ("/health", 0),
    "metrics do not count": ("/metrics", 0),
}


@pytest.mark.parametrize(("path", "during"), CASES.values(), ids=CASES.keys())
async def test_requests_in_flight_are_counted(tmp_path: Path, path: str, during: int) -> None:
    hint = LoadHint(tmp_path / "serving-load")
    app = Recorder(hint)
    await ServingLoadMiddleware(app, hint)({"type": "http", "path": path}, None, None)
    assert app.seen == during
    assert hint.active == 0


async def test_a_crashed_request_is_uncounted(tmp_path: Path) -> None:
    hint = LoadHint(tmp_path / "serving-load")
    with pytest.raises(RuntimeError):
        await ServingLoadMiddleware(Recorder(hint, fail=True), hint)(
            {"type": "http", "path": "/v1/x"}, None, None
        )
    assert hint.active == 0


async def test_the_trainer_sees_the_server_busy(tmp_path: Path) -> None:
    """The worker's real reader, on the file the middleware's hint writes."""
    hint = LoadHint(tmp_path / "serving-load")
    probe = HintFileProbe(tmp_path / "serving-load")
    observed: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        observed.append(probe.busy())

    await ServingLoadMiddleware(app, hint)({"type": "http", "path": "/v1/completions"}, None, None)
    assert observed == [True] and probe.busy() is False


class FakeClock:
    """Wall time that moves only when the test says: the staleness rule is judged on it, never on the host."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_request_longer_than_the_staleness_limit_stays_busy(tmp_path: Path) -> None:
    """The heartbeat keeps the hint fresh: eight 0.1 s ticks of a request are over twice the 0.3 s limit."""
    clock = FakeClock()
    hint = LoadHint(tmp_path / "serving-load", clock=clock)
    probe = HintFileProbe(tmp_path / "serving-load", stale_s=0.3, clock=clock)
    observed: list[bool] = []

    async def long_request(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(8):
            clock.now += 0.1
            await asyncio.sleep(0.02)  # the heartbeat (every 0.005 s) runs between ticks
            observed.append(probe.busy())

    middleware = ServingLoadMiddleware(long_request, hint, heartbeat_s=0.005)
    await middleware({"type": "http", "path": "/v1/completions"}, None, None)
    assert observed == [True] * 8
    assert probe.busy() is False and middleware._heartbeat is None


@pytest.mark.parametrize(("silent_s", "busy"), [(0.1, True), (0.19, True), (0.21, False), (60.0, False)],
                         ids=["fresh", "just-fresh", "just-stale", "long-dead"])  # fmt: skip
def test_without_a_heartbeat_the_reader_takes_a_silent_writer_for_dead(
    tmp_path: Path, silent_s: float, busy: bool
) -> None:
    """The staleness rule the heartbeat exists for: a writer that stops updating reads as idle."""
    clock = FakeClock()
    hint = LoadHint(tmp_path / "serving-load", clock=clock)
    hint.set(1)
    probe = HintFileProbe(tmp_path / "serving-load", stale_s=0.2, clock=clock)
    assert probe.busy() is True
    clock.now += silent_s
    assert probe.busy() is busy
