"""``scope-kv demo``'s default: answer accuracy against KV memory on the trained testbed model.

The shipped testbed model (:mod:`scope_kv.testbed`, a 5.5M-parameter Llama, fp32 on the CPU)
executes one testbed example at its trained length: a 1,667-token prompt of 64 facts and a
352-line program, a 2,113-token output whose every item is checked. It runs three times, greedily:

* the full cache (transformers' ``DynamicCache``), the reference;
* SCOPE ``slide:B/r``: the prompt kept whole, the output held to ``B`` entries;
* unified H2O at the same memory (``unified-h2o:prompt+B/r``): one budget of prompt + ``B``
  entries over prompt and output together.

For each it prints the items answered exactly, by what the item needs (a prompt fact, a value
the output wrote a few items back, or one written far back), and the KV memory the cache held
at the end, measured (:func:`scope_kv.accounting.kv_footprint`), nothing projected.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from transformers import DynamicCache

from ..accounting import kv_footprint
from ..spec import make_cache
from .evaluate import generate_outputs
from .model import TestbedModelMissingError, load_testbed
from .task import KINDS, TRAINED, Example, make_example, output_length, score

__all__ = ["DemoRun", "run_testbed_demo"]

# What the demo took on 2 idle CPU cores (`time scope-kv demo`: 48 s, start-up included), B = 128.
TESTBED_TIME = "about 50 seconds"

KIND_TEXT = {"prompt": "a prompt fact", "hot": "a recent value", "back": "a value far back"}


@dataclass(frozen=True)
class DemoRun:
    """One cache's generation of the example.

    Attributes
    ----------
    label : str
    spec : str
        ``make_cache`` spec (``"full"`` for ``DynamicCache``).
    correct : tuple[bool, ...]
        Per item, in output order.
    output : str
        The generated text (up to ``</s>``).
    entries : int
        Entries held per KV head in layer 0 after the last step.
    allocated_bytes : int
        K/V storage allocated after the last step, every layer.
    seconds : float
    """

    label: str
    spec: str
    correct: tuple[bool, ...]
    output: str
    entries: int
    allocated_bytes: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else 0.0


class _Progress:
    """A ``generate`` streamer writing ``label: n/total tokens, tok/s`` to ``stream``."""

    def __init__(self, label: str, total: int, stream: IO[str], enabled: bool) -> None:
        self.label, self.total, self.stream, self.enabled = label, total, stream, enabled
        self.tty = enabled and bool(getattr(stream, "isatty", lambda: False)())
        self.count = -1  # the prompt comes first
        self.start = time.perf_counter()
        self.shown = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.count += 1
        if not self.enabled or self.count == 0:
            return
        now = time.perf_counter()
        last = self.count == self.total
        if self.tty and (now - self.shown >= 0.25 or last):
            speed = self.count / max(now - self.start, 1e-9)
            self.stream.write(f"\r{self.label}: {self.count}/{self.total} tokens, {speed:.0f} tok/s".ljust(79))
            self.stream.flush()
            self.shown = now
        elif not self.tty and self.count % 512 == 0:
            self.stream.write(f"{self.label}: {self.count}/{self.total} tokens\n")
            self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _generate(model: Any, tokenizer: Any, example: Example, label: str, spec: str, progress: bool) -> DemoRun:
    def build(model: Any, prompt_ids: torch.Tensor) -> Any:
        if spec == "full":
            return DynamicCache(config=model.config)
        return make_cache(model, spec, prompt_tokens=int(prompt_ids.shape[-1]))

    streamer = _Progress(label, output_length(example.n_items), sys.stderr, progress)
    texts, _, cache, _, seconds = generate_outputs(
        model, tokenizer, [example], build, generate_kwargs={"streamer": streamer}
    )
    text = texts[0]
    footprint = kv_footprint(cache)
    return DemoRun(
        label=label,
        spec=spec,
        correct=tuple(score(example, text)),
        output=text,
        entries=footprint.entries[0],
        allocated_bytes=footprint.allocated_bytes,
        seconds=seconds,
    )


def _kind_accuracy(example: Example, run: DemoRun, kind: str) -> str:
    marks = [c for c, item in zip(run.correct, example.items, strict=True) if item.kind == kind]
    return f"{100 * np.mean(marks):.0f} %" if marks else "-"


def run_testbed_demo(
    budget: int = 128,
    recent: int = 64,
    seed: int = 0,
    items: int = TRAINED.n_items,
    progress: bool = True,
    out: IO[str] | None = None,
) -> int:
    """Run the testbed demo (printing to ``out``, standard output by default); returns the exit
    status (1 when the model is missing)."""
    out = out if out is not None else sys.stdout
    started = time.perf_counter()
    try:
        model, tokenizer = load_testbed()
    except TestbedModelMissingError as error:
        print(error, file=sys.stderr)
        return 1
    example = make_example(seed, TRAINED.n_bindings, items)
    prompt_tokens = len(example.prompt_ids)
    total = output_length(items)
    kinds = {kind: sum(item.kind == kind for item in example.items) for kind in KINDS}
    print(
        f"testbed model ({model.num_parameters() / 1e6:.1f}M parameters, trained to execute such programs, shipped "
        f"with scope_kv); example {seed}: a {prompt_tokens:,}-token prompt (64 facts, a {items}-line program), "
        f"a {total:,}-token output of {items} items, each checked. An item needs a prompt fact "
        f"({kinds['prompt']}), a value the output wrote a few items back ({kinds['hot']}) or one written far back "
        f"({kinds['back']}). Greedy, on {torch.get_num_threads()} CPU thread(s).",
        file=out,
        flush=True,
    )
    methods = [
        ("full cache (DynamicCache)", "full"),
        (f"SCOPE slide:{budget}/{recent}", f"slide:{budget}/{recent}"),
        ("unified H2O, same memory", f"unified-h2o:prompt+{budget}/{recent}"),
    ]
    runs = [_generate(model, tokenizer, example, label, spec, progress) for label, spec in methods]

    full = runs[0]
    width = max(len(r.label) for r in runs)
    print(file=out)
    header = (
        f"{'cache':<{width}}  {'items right':>11}  {'prompt fact':>11}  {'recent value':>12}  {'far value':>9}  "
        f"{'KV entries':>10}  {'KV memory':>9}  {'vs full':>7}  {'seconds':>7}"
    )
    print(header, file=out)
    for r in runs:
        print(
            f"{r.label:<{width}}  {sum(r.correct):>5}/{len(r.correct):<5}  "
            f"{_kind_accuracy(example, r, 'prompt'):>11}  {_kind_accuracy(example, r, 'hot'):>12}  "
            f"{_kind_accuracy(example, r, 'back'):>9}  {r.entries:>10,}  "
            f"{r.allocated_bytes / 2**20:>6.2f} MiB  {100 * r.allocated_bytes / full.allocated_bytes:>6.0f}%  "
            f"{r.seconds:>7.1f}",
            file=out,
        )
    print(
        f"(KV entries: held per KV head in layer 0 at the end; KV memory: K/V storage allocated, all "
        f"{model.config.num_hidden_layers} layers, measured after the last token)",
        file=out,
    )
    for r in runs[1:]:
        wrong = [i for i, c in enumerate(r.correct) if not c]
        if not wrong:
            print(f"\n{r.label}: every item right.", file=out)
            continue
        item = example.items[wrong[0]]
        got = r.output[item.chars[0] : item.chars[1]] if len(r.output) >= item.chars[1] else r.output[item.chars[0] :]
        print(
            f"\n{r.label}: {len(wrong)} items wrong, the first at item {item.index + 1} (it needs "
            f"{KIND_TEXT[item.kind]}{'' if item.src_item < 0 else f', written at item {item.src_item + 1}'}): "
            f"expected {item.text!r}, wrote {got!r}",
            file=out,
        )
    print(
        f"\nSCOPE keeps the prompt whole and the output's heavy hitters within {budget} entries; unified H2O spends "
        f"the same prompt + {budget} entries on whichever tokens of prompt and output were attended most. "
        "Across budgets, 16 examples and twice the length: README, 'Quality' (scope-kv eval testbed).",
        file=out,
    )
    print(f"demo took {time.perf_counter() - started:.0f} s", file=out)
    return 0
