"""The group's collectives over torch.distributed process groups: JSON exchanges, gradient sums, broadcasts.

One `Comms` per epoch: its process groups are built on the epoch's prefix of the store and dropped when the
group re-forms (a process group cannot change its members). Plain process-group objects, not torch's global
default group: a worker re-forms many times in its life, and the global group is meant to be set up once.

The control exchange always runs on gloo (small CPU tensors). Gradients and weights run on gloo for CPU
tensors and on NCCL for CUDA tensors, unless `tensor_backend="gloo"` (HOGWILD_GROUP_TENSOR_BACKEND): gloo
moves CUDA tensors through the host, slower, but it runs two ranks on one GPU, which NCCL refuses. That is how
the GPU test runs a group on the one lent GPU; NCCL itself is written but unverified (docs/replicas.md).

A member that dies mid-collective makes the others' collective raise (gloo: "Connection closed by peer",
within seconds), and a member that hangs makes it time out after `timeout_s`: both surface as `GroupBroken`.
"""

from __future__ import annotations

import datetime
import io
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24  # float32 elements per gradient all-reduce: bounds the staging buffer at 64 MiB


class GroupBroken(RuntimeError):
    """A collective failed: a member died, hung, or left. The group re-forms."""


class Comms:
    def __init__(
        self,
        store: dist.Store,
        *,
        epoch: int,
        rank: int,
        size: int,
        timeout_s: float,
        device: torch.device,
        on_reduce: Callable[[float], None] | None = None,
        tensor_backend: str = "auto",
    ) -> None:
        self.rank, self.size, self.device = rank, size, device
        prefix = dist.PrefixStore(f"epoch/{epoch}/pg", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            # Any: torch's stubs give the backend classes no collective methods, though they have them.
            self.control: Any = dist.ProcessGroupGloo(
                dist.PrefixStore("control", prefix), rank, size, timeout
            )
            if device.type == "cuda" and tensor_backend != "gloo":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.tensors: Any = dist.ProcessGroupNCCL(
                    dist.PrefixStore("tensors", prefix), rank, size, options
                )
            else:
                self.tensors = self.control
        except RuntimeError as err:
            raise GroupBroken(f"cannot build the process group of epoch {epoch}: {err}") from err
        self._on_reduce = on_reduce

    @staticmethod
    def _wait(work: Any, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as err:
            raise GroupBroken(f"{what} failed: {err}") from err

    # ---- bytes and JSON --------------------------------------------------------------------------------------
    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every member's `data`, by rank (two allgathers: the lengths, then the padded bytes)."""
        length = torch.tensor([len(data)], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._wait(self.control.allgather([lengths], [length]), "exchange")
        longest = max(int(n) for n in lengths)
        mine = torch.zeros(max(1, longest), dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.zeros(max(1, longest), dtype=torch.uint8) for _ in range(self.size)]
        self._wait(self.control.allgather([outs], [mine]), "exchange")
        return [bytes(out[: int(n)].numpy()) for out, n in zip(outs, lengths, strict=True)]

    def gather_json(self, value: Any) -> list[Any]:
        return [json.loads(raw) for raw in self.gather_bytes(json.dumps(value).encode())]

    def broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        length = torch.tensor([len(data) if self.rank == src and data is not None else 0], dtype=torch.int64)
        self._wait(self.control.broadcast(length, src), "broadcast")
        buffer = torch.zeros(max(1, int(length)), dtype=torch.uint8)
        if self.rank == src and data:
            buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._wait(self.control.broadcast(buffer, src), "broadcast")
        return bytes(buffer[: int(length)].numpy())

    def broadcast_object(self, value: Any, src: int) -> Any:
        """A torch-saved object (tensors and plain values) from `src`; loaded with weights_only on the others."""
        raw = None
        if self.rank == src:
            out = io.BytesIO()
            torch.save(value, out)
            raw = out.getvalue()
        data = self.broadcast_bytes(raw, src)
        return value if self.rank == src else torch.load(io.BytesIO(data), weights_only=True)

    # ---- tensors ------------------------------------------------------------------------------------------------
    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Overwrite every member's `tensors` with src's, in place (the served weights: no second copy kept)."""
        for tensor in tensors:
            staging = tensor if tensor.is_contiguous() else tensor.contiguous()
            self._wait(self.tensors.broadcast(staging, src), "weight broadcast")
            if staging is not tensor:
                tensor.copy_(staging)

    def sum_gradients_(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every parameter's gradient with the sum over members (float32 buckets; None counts as 0).

        Every member gets the same bytes back, so the identical optimizer step that follows keeps the weights
        bit-identical. A member with no share of the batch has no gradients and adds zeros."""
        started = time.perf_counter()
        bucket: list[torch.Tensor] = []
        filled = 0
        for param in params:
            if filled and filled + param.numel() > BUCKET_ELEMENTS:
                self._sum_bucket(bucket, filled)
                bucket, filled = [], 0
            bucket.append(param)
            filled += param.numel()
        if bucket:
            self._sum_bucket(bucket, filled)
        if self._on_reduce is not None:
            self._on_reduce(time.perf_counter() - started)

    def _sum_bucket(self, params: Sequence[torch.Tensor], elements: int) -> None:
        device = params[0].device
        flat = torch.zeros(elements, dtype=torch.float32, device=device)
        offset = 0
        for param in params:
            if param.grad is not None:
                flat[offset : offset + param.numel()].copy_(param.grad.reshape(-1))
            offset += param.numel()
        self._wait(self.tensors.allreduce([flat]), "gradient all-reduce")
        offset = 0
        for param in params:
            summed = flat[offset : offset + param.numel()].view_as(param)
            if param.grad is None:
                param.grad = summed.to(param.dtype)
            else:
                param.grad.copy_(summed)
            offset += param.numel()

    def sum_scalars(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64)
        self._wait(self.control.allreduce([tensor]), "all-reduce")
        return [float(v) for v in tensor]
