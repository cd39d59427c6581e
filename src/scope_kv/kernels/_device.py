"""What the kernels share: whether Triton is there, and launching on a tensor's own GPU."""

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
