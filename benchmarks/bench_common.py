"""Pieces shared by the decode benchmarks (decode.py, decode_kvpress.py).

Only torch and transformers are imported here: decode_kvpress.py runs in kvpress's own
environment (an older transformers), where scope_kv is not installed.
"""

from __future__ import annotations

import cProfile
import json
import math
import pstats
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_8B = dict(
    num_hidden_layers=32,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


# -- model --------------------------------------------------------------------------------
def build_model(geometry: dict[str, Any], device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(**geometry)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def kv_bytes_per_token(model: LlamaForCausalLM) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elt = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * elt


def weight_bytes_read(model: LlamaForCausalLM) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding table
    (a step reads one row of it)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def measure_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return float("nan")
    n = 1 << 30  # 1 GiB per buffer: far beyond L2
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n / median(times)


def random_kv(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, dtype=like.dtype, device=like.device)


# -- timing -------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


class Stepper:
    """Runs decode steps for one cache; eager, CUDA-graph-captured, or torch.compile'd."""

    def __init__(self, model, cache, batch: int, position: int, mode: str, compiled: Callable | None):
        dev = next(model.parameters()).device
        self.model, self.cache, self.mode = model, cache, mode
        self.ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
        self.pos = torch.full((batch, 1), position, dtype=torch.long, device=dev)
        self.forward = compiled or model.forward
        self.graph = None

    def _eager_step(self) -> None:
        out = self.forward(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True)
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._eager_step()  # warm-up on a side stream, as CUDA graph capture requires
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._eager_step()

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager_step()


def time_steps(stepper: Stepper, warmup: int, steps: int, device: torch.device,
               after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time ``steps`` decode steps after ``warmup`` untimed ones.

    Returns ``per`` (ms per step: CUDA events on a GPU, perf_counter on the CPU), ``total``
    (ms, first to last event) and ``host`` (ms the host took to issue the timed steps, before
    the final synchronisation: when it is close to ``total`` the step is bound by the host,
    not by the GPU). ``after_step`` runs after each step, outside nothing (keep it cheap).
    """
    for _ in range(warmup):
        stepper.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        t0 = time.perf_counter()
        events[0].record()
        for i in range(steps):
            stepper.step()
            events[i + 1].record()
            if after_step is not None:
                after_step()
        host = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        per = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
        total = events[0].elapsed_time(events[-1])
    else:
        marks = [time.perf_counter()]
        for _ in range(steps):
            stepper.step()
            marks.append(time.perf_counter())
            if after_step is not None:
                after_step()
        per = [(marks[i + 1] - marks[i]) * 1e3 for i in range(steps)]
        total = host = (marks[-1] - marks[0]) * 1e3
    return dict(per=per, total=total, host=host)


# -- output -------------------------------------------------------------------------------
def fmt(x: Any, spec: str = ".1f") -> str:
    """A table cell: "-" for a missing or non-finite number."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def write_outputs(result: dict, out: Path, markdown: Callable[[dict], str], plot: Callable[[dict, Path], bool]) -> None:
    """``out``.json (the run), ``out``.md (its tables) and ``out``.png (its plot, when matplotlib is there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))


def python_calls(model, ids: torch.Tensor, new: int, **generate_kwargs: Any) -> tuple[int, int]:
    """(every Python call, the calls into scope_kv's code) of one greedy ``generate`` call of ``new``
    tokens, counted by Python's profiler. Build the cache before and pass it in ``generate_kwargs``,
    so that only the call is counted."""
    profiler = cProfile.Profile()
    profiler.enable()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **generate_kwargs)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    return sum(e[1] for e in stats.values()), sum(e[1] for key, e in stats.items() if "scope_kv" in key[0])
