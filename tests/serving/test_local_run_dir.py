"""Local mode's run dir goes on the memory-backed /dev/shm where it can (the GPU-side wait page-locks the
load-hint file there; on a disk it could not), and stays under the state dir where it cannot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hogwild.local.session import run_dir_for


def _shm(tmp_path: Path, case: str) -> Path:
    shm = tmp_path / "shm"
    if case == "missing":
        return shm
    shm.mkdir()
    if case == "read-only":
        shm.chmod(0o500)
    return shm


@pytest.mark.parametrize(
    ("case", "on_shm"),
    [
        pytest.param("writable", True, id="on-shm"),
        pytest.param("missing", False, id="no-shm-state-dir"),
        pytest.param("read-only", False, id="read-only-shm-state-dir"),
    ],
)
def test_the_run_dir_is_on_shm_where_it_can_be(tmp_path: Path, case: str, on_shm: bool) -> None:
    if case == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    state = tmp_path / "state"
    shm = _shm(tmp_path, case)
    run_dir = run_dir_for(state, shm)
    assert (run_dir.parent == shm) is on_shm
    if on_shm:
        assert run_dir.is_dir() and run_dir.stat().st_mode & 0o777 == 0o700
        assert run_dir_for(state, shm) == run_dir  # the same after a restart
        assert run_dir_for(tmp_path / "other", shm) != run_dir  # one per state dir
    else:
        assert run_dir == state / "run"


@pytest.mark.parametrize(
    "planted", [pytest.param("link", id="a-link"), pytest.param("open", id="open-to-others")]
)
def test_a_planted_name_on_shm_falls_back_to_the_state_dir(tmp_path: Path, planted: str) -> None:
    state, shm = tmp_path / "state", _shm(tmp_path, "writable")
    name = run_dir_for(state, shm).name
    (shm / name).rmdir()
    if planted == "link":
        (tmp_path / "elsewhere").mkdir()
        (shm / name).symlink_to(tmp_path / "elsewhere")
    else:
        (shm / name).mkdir()
        (shm / name).chmod(0o777)
    assert run_dir_for(state, shm) == state / "run"
