"""A replica group on the GPU: two stand-in exporters holding the weights in CUDA memory (exported by CUDA IPC
exactly as the vLLM plugin does), two real workers mapping them, one group.

The tensors of the group go over gloo (through the host), not NCCL: NCCL refuses two ranks on one device, and
the lent machine has one GPU. What this checks on real hardware: CUDA IPC mapping in a group, the on-device
weights digest, the broadcast into a joining member's CUDA weights, bit-identical weights after training, and
a restore through one member that the other takes.
Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from group_helpers import SAMPLES, Group, assert_same_everywhere

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_two_gpu_replicas_train_together_and_a_late_one_receives_the_weights(tmp_path: Path) -> None:
    group = Group(tmp_path, device="cuda")
    try:
        group.start(0)
        group.wait_formed([0])
        status = group.workers[0].call("status")
        assert status["device"].startswith("cuda") and status["exporter"]["backend"] == "cuda_ipc"
        assert group.workers[0].call("train", samples=SAMPLES, steps=3)["step"] == 3
        saved = group.workers[0].call("checkpoint")
        at_checkpoint = group.weights(0)
        group.start(1)  # a fresh replica (base weights) joins: the group hands it the trained ones
        group.wait_formed([0, 1])
        assert_same_everywhere(group, [0, 1])
        reply = group.workers[1].call("train", samples=SAMPLES, steps=3)
        assert reply["step"] == 6
        statuses = assert_same_everywhere(group, [0, 1])
        assert {s["group"]["out_of_sync"] for s in statuses} == {0}
        # a restore through replica 1: it loads the checkpoint into its CUDA weights, replica 0 takes them
        assert group.workers[1].call("restore", step=saved["step"])["step"] == 3
        statuses = assert_same_everywhere(group, [0, 1])
        assert {s["step"] for s in statuses} == {3} and group.weights(0) == at_checkpoint
    finally:
        group.close()
