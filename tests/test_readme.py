"""The README's first code block, run exactly as a new user pastes it (the embedded SmolLM2)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from scope_kv import compat

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert match, "the README has no python code block"
    return match.group(1)


def test_the_readme_top_example_runs_as_written(one_torch_thread):
    code = _first_python_block()
    # written for transformers >= 5.24; before, the comment in the block says to spell it past_key_values=
    code = code.replace("cache=cache", f"{compat.CACHE_KWARG}=cache")
    assert "load_smollm2()" in code and "make_cache(" in code  # model, inputs and cache come from the block itself
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    cache, inputs = namespace["cache"], namespace["inputs"]
    prompt = inputs["input_ids"].shape[-1]
    new = namespace["out"].shape[-1] - prompt
    printed = out.getvalue().splitlines()
    # the streamer printed the answer, then the two lines the block prints
    assert len(printed) > 5, printed
    seen, held = (int(x) for x in printed[-2].split())
    assert seen == prompt + new - 1 and new > 65, (seen, prompt, new)
    assert held <= prompt + 65 < seen, "the cache must have compressed (else the example shows nothing)"
    assert int(printed[-1]) == cache.nbytes() > 0
