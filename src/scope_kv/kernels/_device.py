"""What the kernels share: whether Triton is there, and launching on a tensor's own GPU."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it needs no GPU under ``TRITON_INTERPRET=1``)."""
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
