"""`triton.jit` as a typed decorator, for the optimizer's Triton kernels.

Why: Triton ships no type information (no py.typed), so mypy sees `triton.jit` as `Any`, and --strict counts
every kernel whose arguments carry annotations (`BLOCK: tl.constexpr`) as untyped. The kernels themselves
are launched as `kernel[grid](...)`, which stays `Any`: Triton checks those arguments when it compiles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

KernelDecorator = Callable[[Callable[..., object]], Any]


def kernel(*, do_not_specialize: Sequence[str] = ()) -> KernelDecorator:
    """`@triton.jit`, or `@triton.jit(do_not_specialize=...)` for arguments whose every value must share one
    compiled variant. Only called where Triton imports (the kernel modules test for it first)."""
    import triton

    decorator: KernelDecorator = (
        triton.jit(do_not_specialize=list(do_not_specialize)) if do_not_specialize else triton.jit
    )
    return decorator
