"""The replica group's pure decisions (hogwild.worker.group.plan) and the sharding of a step's samples."""

from __future__ import annotations

import math

import pytest

from hogwild.worker import batches
from hogwild.worker.batches import Encoded
from hogwild.worker.group.plan import (
    Control,
    Stop,
    agreed_loss,
    decide,
    in_sync,
    members_of,
    needs_weights,
    shard_bounds,
    sync_source,
)


def control(replica: int, **fields: object) -> Control:
    return Control(replica=replica, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("controls", "epoch", "jobs", "regroup", "stop"),
    [
        ([control(0), control(1)], 1, (), False, Stop.NONE),
        ([control(0, job={"a": 1}), control(1)], 1, ((0, {"a": 1}),), False, Stop.NONE),
        # two requests arrive at two members at once: both run, in rank order
        (
            [control(0, job={"a": 1}), control(1, job={"b": 2})],
            1,
            ((0, {"a": 1}), (1, {"b": 2})),
            False,
            Stop.NONE,
        ),
        # a member leaves: nothing starts, everyone re-forms
        ([control(0, job={"a": 1}), control(1, leaving=True)], 1, (), True, Stop.REGROUP),
        # a joiner bumped the epoch: one member saw it, all re-form
        ([control(0, epoch_seen=2), control(1, epoch_seen=1)], 1, (), True, Stop.REGROUP),
        ([control(0, epoch_seen=1), control(1, epoch_seen=1)], 1, (), False, Stop.NONE),
        # the furthest stop reason wins
        ([control(0, stop=Stop.PAUSED), control(1, stop=Stop.TIMEOUT)], 1, (), False, Stop.TIMEOUT),
        ([control(0, stop=Stop.SHUTDOWN), control(1)], 1, (), False, Stop.SHUTDOWN),
        # one member left a shared request the other is still in: never pair those exchanges up
        ([control(0, phase="step"), control(1, job={"a": 1})], 1, (), True, Stop.REGROUP),
    ],
)
def test_decide(controls: list[Control], epoch: int, jobs: tuple, regroup: bool, stop: Stop) -> None:
    decision = decide(controls, epoch)
    assert (decision.jobs, decision.regroup, decision.stop) == (jobs, regroup, stop)
    assert decision.out_of_step == (len({c.phase for c in controls}) > 1)


@pytest.mark.parametrize(
    ("controls", "resets"),
    [
        ([control(0), control(1)], ()),
        # a restore waits in replica 1: it runs there, the others take its state
        ([control(0, job={"a": 1}), control(1, reset=True)], (1,)),
        # two at once: both, in rank order (the later one's state is what every member ends with)
        ([control(0, reset=True), control(1, reset=True)], (0, 1)),
        # the group re-forms: nothing runs now (each waits in its member for the next formation)
        ([control(0, reset=True), control(1, leaving=True)], ()),
    ],
)
def test_decide_runs_restores_and_rollbacks_in_rank_order(controls: list[Control], resets: tuple) -> None:
    assert decide(controls, 1).resets == resets


@pytest.mark.parametrize("reset", [True, False])
def test_a_control_crosses_the_wire_whole(reset: bool) -> None:
    sent = control(1, phase="step", step=3, digest="ab", saved_step=2, configure=({"lr": 1},), reset=reset)
    assert Control.from_wire(sent.to_wire()) == sent


@pytest.mark.parametrize(
    ("said", "agreed"),
    [
        ([(None, None), (None, None)], (None, None)),  # the gate is off everywhere
        ([(2.5, None), (2.5, None)], (2.5, None)),
        # rank 0 joined after the evaluation set was sent: every member judges with rank 1's loss
        ([(None, ("invalid", "needs an evaluation set")), (2.5, None)], (2.5, None)),
        # nobody holds a set: every member fails the request with the lowest rank's error
        ([(None, ("invalid", "a")), (None, ("invalid", "b"))], (None, ("invalid", "a"))),
        ([(math.nan, None), (2.5, None)], (math.nan, None)),  # NaN is a loss: the gate refuses to train
    ],
)
def test_agreed_loss(said: list, agreed: tuple) -> None:
    loss, error = agreed_loss(said)
    assert error == agreed[1]
    assert loss == agreed[0] or (math.isnan(agreed[0]) and loss is not None and math.isnan(loss))


def test_decide_applies_every_members_configure_in_rank_order() -> None:
    controls = [control(0, configure=({"lr": 1},)), control(1, configure=({"lr": 2}, {"paused": True}))]
    assert decide(controls, 1).configure == ((0, {"lr": 1}), (1, {"lr": 2}), (1, {"paused": True}))


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([(3, "a"), (3, "a")], True),
        ([(3, "a"), (3, "b")], False),  # same step, different bytes: diverged
        ([(3, "a"), (2, "a")], False),
        ([(3, "a"), (3, None)], None),  # a member has no digest yet
    ],
)
def test_in_sync(states: list[tuple[int, str | None]], expected: bool | None) -> None:
    assert in_sync([control(i, step=s, digest=d) for i, (s, d) in enumerate(states)]) is expected


@pytest.mark.parametrize(
    ("states", "source", "weights"),
    [
        ([(5, "a"), (5, "a")], 0, False),  # stayed together: nothing to send but the state
        ([(5, "a"), (0, "b")], 0, True),  # a member came back from a restart
        ([(0, "b"), (5, "a"), (5, "a")], 1, True),  # the furthest trained, lowest rank among equals
        ([(2, "a"), (3, "c"), (3, "d")], 1, True),  # one survivor applied a step the other did not
    ],
)
def test_sync_source(states: list[tuple[int, str]], source: int, weights: bool) -> None:
    assert sync_source(states) == source
    assert needs_weights(states) is weights


def test_members_are_ascending_and_unique() -> None:
    assert members_of([2, 0, 2, 1]) == (0, 1, 2)


@pytest.mark.parametrize(
    ("count", "size", "bounds"),
    [
        (6, 2, [(0, 3), (3, 6)]),
        (5, 2, [(0, 3), (3, 5)]),
        (1, 3, [(0, 1), (1, 1), (1, 1)]),  # more ranks than samples: the others add zeros
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
    ],
)
def test_shard_bounds_cover_every_item_once(count: int, size: int, bounds: list[tuple[int, int]]) -> None:
    assert [shard_bounds(count, rank, size) for rank in range(size)] == bounds


def sample(n: int) -> Encoded:
    return Encoded(list(range(1, n + 1)), list(range(1, n + 1)))


@pytest.mark.parametrize(("size", "grad_accumulation"), [(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)])
def test_shards_keep_the_global_targets_and_split_the_samples(size: int, grad_accumulation: int) -> None:
    encoded = [sample(n) for n in (4, 5, 6)]
    whole = batches.step_batch(encoded, max_tokens=4096, grad_accumulation=grad_accumulation, pad_id=0)
    shards = [
        batches.step_batch(
            encoded, max_tokens=4096, grad_accumulation=grad_accumulation, pad_id=0, shard=(rank, size)
        )
        for rank in range(size)
    ]
    # every rank normalises by all targets, so the summed gradients are those of the one big batch
    assert {s.targets for s in shards} == {whole.targets}
    assert sum(s.tokens for s in shards) == whole.tokens
    rows = sum(int(m.input_ids.shape[0]) for s in shards for m in s.micro_batches)
    assert rows == len(encoded)
