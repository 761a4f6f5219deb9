"""The worker's jobs off the socket thread: a job that fails answers an error that names that job.

Real: a WorkerService (no weights mapped) and its job threads; the failing piece is the job's own method,
replaced on the instance by one that raises what a full disk or a broken file would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hogwild.config import TrainingConfig
from hogwild.protocol import CheckpointRequest, ProtocolError, Request, RestoreRequest, RollbackRequest
from hogwild.versions import parse_target
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.service import WorkerService, WorkerSettings


@pytest.fixture
def service(tmp_path: Path) -> Iterator[WorkerService]:
    settings = WorkerSettings(run_dir=tmp_path / "run", checkpoint_dir=tmp_path / "checkpoints")
    settings.run_dir.mkdir()
    worker = WorkerService(settings, TrainingConfig(), WorkerMetrics())
    yield worker
    worker.shutdown()


JOBS = [
    ("restore", RestoreRequest()),
    ("rollback", RollbackRequest(to=parse_target("previous"))),
    ("checkpoint", CheckpointRequest()),
]


@pytest.mark.parametrize(("job", "request_"), JOBS, ids=[job for job, _ in JOBS])
def test_a_failed_job_answers_an_error_that_names_it(
    service: WorkerService, monkeypatch: pytest.MonkeyPatch, job: str, request_: Request
) -> None:
    def fail(*_: Any) -> dict[str, Any]:
        raise OSError("No space left on device")

    monkeypatch.setattr(service, job, fail)
    answered = threading.Event()
    replies: list[dict[str, Any] | ProtocolError] = []

    def done(reply: dict[str, Any] | ProtocolError) -> None:
        replies.append(reply)
        answered.set()

    service.handle(request_, done)
    assert answered.wait(10)
    [reply] = replies
    assert isinstance(reply, ProtocolError)
    assert (reply.code, reply.message) == ("internal", f"{job} failed: OSError: No space left on device")
    assert not service.writing  # the next checkpoint, restore or rollback may start
