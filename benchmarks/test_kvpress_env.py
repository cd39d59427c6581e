"""benchmarks/decode_kvpress.py in kvpress's own environment (transformers < 5.3).

Not part of the package's suite (tests/ needs scope_kv and transformers >= 5.17); CI runs it
in a separate environment: ``pip install torch==2.13.0 kvpress==0.5.5 pytest`` then
``python -m pytest benchmarks/test_kvpress_env.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decoding_press_smoke(tmp_path):
    out = tmp_path / "kv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode_kvpress.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().startswith("# kvpress DecodingPress")
    s = result["settings"]
    assert not result["errors"]
    seen = {(p["method"], p["batch"]) for p in result["points"]}
    expected = {("dynamic", b) for b in s["batches"]}
    expected |= {(f"kvpress-{sc}-i{i}", b) for b in s["batches"] for sc in s["scorers"] for i in s["intervals"]}
    assert seen == expected
    for p in result["points"]:
        assert p["ms_mean"] > 0 and p["ms_min"] <= p["ms_median"] <= p["ms_max"]
        if p["scorer"] is None:
            # The bridge row: a DynamicCache of P + B entries growing by one per step, never cut.
            assert p["cuts"] == 0 and p["held_min"] == s["prompt"] + s["budget"] + s["warmup"] + 1
            continue
        # DecodingPress really ran: one cut per layer per interval, back to target_size, and its
        # peak equals Slide's prompt + budget (the equal-memory setting).
        assert p["target"] == s["prompt"] + s["budget"] - p["interval"]
        assert p["cuts"] == s["windows"]
        assert p["held_min"] == p["target"]
        assert p["peak_entries"] == s["prompt"] + s["budget"]
