"""Training's guaranteed share beside a server that never idles: the token bucket, and both gates keeping it.

Every clock here is injected: the assertions are about the share arithmetic, never about how fast this
machine is.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hogwild.config import ServingProtection
from hogwild.load_hint import HINT_NAME, LoadHint
from hogwild.worker.protection import GateStats, ServingGate, install_preemption_points
from hogwild.worker.protection.device import WATCH_S, HoldPolicy
from hogwild.worker.protection.probes import HintFileProbe
from hogwild.worker.protection.share import WINDOW_S, TrainingShare
from model_helpers import tiny_qwen2

# ---- the bucket ----------------------------------------------------------------------------------------------
# (floor, what happens: ("ran" | "held", seconds), expected hold allowed after it)
BUCKET_CASES = [
    pytest.param(0.1, [], 0.9 * WINDOW_S, id="starts-full"),
    pytest.param(0.1, [("held", 4.5)], 0.0, id="a-full-bucket-holds-4.5s-at-0.1"),
    pytest.param(0.1, [("held", 4.5), ("ran", 0.001)], 0.009, id="each-second-run-earns-nine-held"),
    pytest.param(0.5, [("held", 2.5), ("ran", 0.2)], 0.2, id="half-earns-one-for-one"),
    pytest.param(0.1, [("ran", 100.0)], 0.9 * WINDOW_S, id="capped-at-the-window"),
    pytest.param(0.1, [("held", 5.0)], 0.0, id="an-overshoot-is-a-debt"),
    pytest.param(0.1, [("held", 5.0), ("ran", 0.05)], 0.0, id="repaid-before-any-hold"),
    pytest.param(0.0, [("held", 100.0)], math.inf, id="no-floor-no-limit"),
    pytest.param(1.0, [("ran", 10.0)], 0.0, id="floor-one-never-holds"),
]


@pytest.mark.parametrize(("floor", "events", "allowed"), BUCKET_CASES)
def test_training_earns_the_holding_it_allows(
    floor: float, events: list[tuple[str, float]], allowed: float
) -> None:
    share = TrainingShare(floor, now=0.0)
    now = 0.0
    for kind, seconds in events:
        now += seconds
        getattr(share, kind)(seconds, now)
    assert share.hold_allowed_s() == pytest.approx(allowed, abs=1e-9)


@pytest.mark.parametrize(
    ("events", "delivered"),
    [
        pytest.param([], 1.0, id="never-held"),
        pytest.param([("ran", 0.01), ("held", 0.01)] * 500, 0.5, id="half"),
        pytest.param([("ran", 0.001), ("held", 0.009)] * 1000, 0.1, id="the-default-duty"),
        # The old time leaves: a minute of holding, then a minute of training, reads as training now.
        pytest.param([("held", 60.0)] + [("ran", 1.0)] * 60, 1.0, id="old-holds-decay"),
    ],
)
def test_the_delivered_share_is_of_the_trainer_s_recent_time(
    events: list[tuple[str, float]], delivered: float
) -> None:
    share = TrainingShare(0.1, now=0.0)
    now = 0.0
    for kind, seconds in events:
        now += seconds
        getattr(share, kind)(seconds, now)
    assert share.delivered(now) == pytest.approx(delivered, abs=2e-3)


def test_a_higher_floor_set_hot_clips_the_credit() -> None:
    share = TrainingShare(0.1, now=0.0)
    share.set_floor(0.5)
    assert share.hold_allowed_s() == pytest.approx(0.5 * WINDOW_S)
    with pytest.raises(ValueError, match="within"):
        share.set_floor(1.5)


# ---- the host gate ------------------------------------------------------------------------------------------
class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class AlwaysBusy:
    def busy(self) -> bool:
        return True


# (floor, chunk of training between points, points per step, pause between steps, whether the caller says the
# step ended). The pause is the reply and the next request: neither training nor held.
HOST_CASES = [
    pytest.param(0.1, 0.001, 50, 0.0, True, id="default-back-to-back"),
    pytest.param(0.1, 0.001, 50, 0.3, True, id="default-pauses-between-steps"),
    pytest.param(0.25, 0.002, 50, 0.3, True, id="quarter-pauses"),
    pytest.param(0.5, 0.001, 20, 0.05, True, id="half"),
    pytest.param(0.05, 0.001, 50, 0.3, True, id="five-percent"),
    # Without the step's end, a pause longer than IDLE_GAP_S still does not count as training.
    pytest.param(0.1, 0.001, 50, 2.0, False, id="long-pauses-without-idle"),
]


@pytest.mark.parametrize(("floor", "chunk_s", "points", "pause_s", "says_idle"), HOST_CASES)
def test_a_server_that_never_idles_leaves_the_trainer_its_floor_on_the_host(
    floor: float, chunk_s: float, points: int, pause_s: float, says_idle: bool
) -> None:
    """The trainer's time (training + held) is at least `floor` training, pauses between steps aside.

    Before: the pauses counted as training, so with 0.3 s between steps of 50 ms the trainer kept 0.02."""
    fake = FakeTime()
    settings = ServingProtection(max_wait_s=1.0, min_training_share=floor)
    gate = ServingGate(AlwaysBusy(), settings, clock=fake.clock, sleep=fake.sleep)
    trained = paused = 0.0
    while fake.now < 300.0:
        for _ in range(points):
            gate.point()
            fake.now += chunk_s
            trained += chunk_s
        if says_idle:
            gate.idle()
        fake.now += pause_s
        paused += pause_s
    warmup = (1.0 - floor) * WINDOW_S  # the bucket starts full
    assert trained / (fake.now - paused - warmup) >= floor * 0.97
    assert gate.stats.training_share >= floor * 0.97


# ---- the GPU-side wait's watchdog -----------------------------------------------------------------------------
def _run_watchdog(policy: HoldPolicy, seconds: float, busy: bool, host_blocks: bool) -> float:
    """Ticks the policy every WATCH_S. The trainer's host passes a point whenever its stream is open; held, it
    blocks on a sync (`host_blocks`) or keeps launching. The stream passes its waits while the server's byte
    says idle or the trainer's says open. Returns the fraction of ticks it passed."""
    now, opened, ticks = 0.0, 0, 0
    policy.point(now)
    passes = False
    while now < seconds:
        now += WATCH_S
        if passes or not host_blocks:
            policy.point(now)
        passes = policy.tick(now, busy=busy, stale=False) or not busy
        opened += passes
        ticks += 1
    return opened / ticks


@pytest.mark.parametrize(
    ("floor", "host_blocks"),
    [
        # Before: a held trainer blocked on a sync passed no point, stopped counting as held after 0.5 s, and
        # the share never opened the gate: only max_wait_s did, one tick a second (0.005 of the time).
        pytest.param(0.1, True, id="default-host-blocked-while-held"),
        pytest.param(0.1, False, id="default-host-launching"),
        pytest.param(0.25, True, id="quarter"),
        pytest.param(0.5, True, id="half"),
    ],
)
def test_a_server_that_never_idles_leaves_the_trainer_its_floor_in_the_gpu(
    floor: float, host_blocks: bool
) -> None:
    stats = GateStats()
    policy = HoldPolicy(ServingProtection(min_training_share=floor, max_wait_s=1.0), stats, now=0.0)
    seconds = 200.0
    open_fraction = _run_watchdog(policy, seconds, busy=True, host_blocks=host_blocks)
    warmup = (1.0 - floor) * WINDOW_S
    assert open_fraction * seconds / (seconds - warmup) >= floor * 0.97
    assert stats.training_share >= floor * 0.97 and stats.share_kept > 0


def test_an_idle_server_never_holds_and_a_finished_step_is_not_held() -> None:
    stats = GateStats()
    policy = HoldPolicy(ServingProtection(), stats, now=0.0)
    assert _run_watchdog(policy, 10.0, busy=False, host_blocks=True) == 1.0
    policy.idle()  # the step ended: a busy server now holds nobody, and no credit is spent on it
    credit = policy.share.hold_allowed_s()
    for tick in range(1, 200):
        policy.tick(10.0 + tick * WATCH_S, busy=True, stale=False)
    assert policy.share.hold_allowed_s() == credit and stats.waited_s == 0.0


# ---- a real model's points on a load hint that always says busy ------------------------------------------------
CHUNK_S = 0.005


@pytest.mark.parametrize("floor", [pytest.param(0.1, id="default"), pytest.param(0.25, id="quarter")])
def test_training_keeps_its_floor_beside_an_always_busy_hint(tmp_path: Path, floor: float) -> None:
    """The server's hint file says busy throughout; each chunk between two of the model's points costs 5 ms
    of the gate's clock. Every step finishes, and training takes at least its floor of the trainer's time."""
    hint = LoadHint(tmp_path / HINT_NAME)
    hint.set(4)
    fake = FakeTime()
    gate = ServingGate(
        HintFileProbe(tmp_path / HINT_NAME),
        ServingProtection(min_training_share=floor),
        clock=fake.clock,
        sleep=fake.sleep,
    )
    model = tiny_qwen2(tied=False)
    chunks = 0

    def point() -> None:
        nonlocal chunks
        gate.point()
        fake.now += CHUNK_S
        chunks += 1

    install_preemption_points(model, point)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    steps = 0
    while fake.now < 20.0:
        model(input_ids=ids, labels=ids).loss.backward()
        gate.idle()
        steps += 1
        hint.set(4)  # the server's heartbeat: a fresh busy hint, never stale
    hint.close()
    warmup = (1.0 - floor) * WINDOW_S
    assert steps > 0 and gate.stats.waits > 0
    assert chunks * CHUNK_S / (fake.now - warmup) >= floor * 0.97


@pytest.mark.parametrize(
    ("settings", "floor"),
    [
        pytest.param(ServingProtection(), 0.1, id="default"),
        pytest.param(ServingProtection(min_training_share=0.25), 0.25, id="quarter"),
        pytest.param(ServingProtection(yield_when_busy=False), 0.0, id="protection-off-has-no-floor"),
    ],
)
def test_the_floor_shown_follows_hot_changes(settings: ServingProtection, floor: float) -> None:
    gate = ServingGate(AlwaysBusy(), ServingProtection(min_training_share=0.5))
    assert gate.stats.training_share_floor == 0.5
    gate.update(settings)
    assert gate.stats.training_share_floor == floor
    assert gate.share.hold_allowed_s() <= (1.0 - settings.min_training_share) * WINDOW_S
