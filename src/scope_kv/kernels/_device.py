"""What the kernels share: whether Triton is there, launching on a tensor's own GPU, and handing
the device small host-side numbers without waiting for it."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether Triton can be imported (it needs no GPU under ``TRITON_INTERPRET=1``).

    torch.compile takes the answer as a constant of the graph rather than tracing into the cached
    import check (which it would warn about on every compile).
    """
    return _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def on_device(t: torch.Tensor) -> Any:
    """Launch on the tensors' GPU, not the current one (a model split over GPUs has layers
    elsewhere); switching devices costs host time on every layer of every step, so only when
    it differs."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host-side ``values`` on ``device``, copied without making the host wait for the
    device: on CUDA through pinned memory and a copy queued on the current stream (the caching
    host allocator keeps the pinned buffer until the copy has run)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
