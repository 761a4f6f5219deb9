"""A digest of the served weights: equal digests mean bit-identical weights (what "in sync" checks).

On CPU it is SHA-256 over every parameter's bytes. On CUDA, hashing on the host would copy the weights out
every step; there each parameter's bits are reduced on the device to two 64-bit sums (plain, and weighted by
position modulo a prime), which catch any realistic divergence; those sums are hashed. Parameters are read
in the trainer's order (its named parameters), so every replica digests the same sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POSITION_PRIME = 65521


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().view(-1)
    return flat.view(_INT_OF_SIZE[flat.element_size()])


_CHUNK = 1 << 24  # elements per device reduction: bounds the int64 temporaries (128 MiB each)


def _device_sums(tensor: torch.Tensor) -> tuple[int, int]:
    bits = _bits(tensor)
    plain = torch.zeros((), dtype=torch.int64, device=bits.device)
    weighted = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start : start + _CHUNK].to(torch.int64)
        positions = torch.arange(start, start + chunk.numel(), device=bits.device, dtype=torch.int64)
        plain += chunk.sum()
        weighted += (chunk * (positions % _POSITION_PRIME + 1)).sum()
    return int(plain), int(weighted)


def weights_digest(params: Sequence[torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for param in params:
        if param.is_cuda:
            plain, weighted = _device_sums(param)
            hasher.update(f"{plain}:{weighted};".encode())
        else:
            hasher.update(_bits(param).numpy().tobytes())
    return hasher.hexdigest()[:16]
