"""benchmarks/decode_kvpress.py's comparison with decode.py's rows (the arithmetic behind the
kvpress figures). The DecodingPress run itself needs kvpress's environment (transformers < 5.3):
CI runs benchmarks/test_kvpress_env.py there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode_kvpress  # noqa: E402


def _decode_json():
    pts = []
    for method, ms in (("slide", {1024: 20.0, 4096: 22.0}), ("slide+graph", {1024: 10.0, 4096: 10.0})):
        for gen, t in ms.items():
            pts.append(dict(method=method, batch=8, generated=gen, ms_mean=t))
    pts.append(dict(method="slide", batch=8, generated=0, ms_mean=99.0))  # before the pool fills: not steady
    pts.append(dict(method="dynamic", batch=8, generated=512, ms_mean=40.0))
    pts.append(dict(method="dynamic", batch=8, generated=512, ms_mean=45.0))  # a slower repeat: ignored
    pts.append(dict(method="slide", batch=8, generated=4096, ms_mean=30.0))  # a slower repeat: ignored
    pts.append(dict(method="dynamic", batch=8, generated=2048, ms_mean=77.0))  # other size: not the bridge
    pts.append(dict(method="slide", batch=32, generated=4096, ms_mean=50.0))
    return dict(settings=dict(budget=512, prompt=4096), points=pts)


def _kv_result():
    def row(method, scorer, batch, ms, peak):
        return dict(method=method, scorer=scorer, batch=batch, ms_mean=ms, peak_entries=peak)

    return dict(points=[row("dynamic", None, 8, 50.0, 4609), row("kvpress-knorm-i128", "knorm", 8, 63.0, 4608),
                        row("kvpress-knorm-i128", "knorm", 16, 70.0, 4608),
                        row("kvpress-knorm-i128", "knorm", 8, 80.0, 4608)])  # a slower repeat: ignored


def test_compare_uses_steady_slide_and_same_batch():
    rows = decode_kvpress.compare(_kv_result(), _decode_json())
    assert [(r["method"], r["batch"]) for r in rows] == [("kvpress-knorm-i128", 8), ("kvpress-knorm-i128", 16)]
    r8, r16 = rows
    assert r8["slide_ms"] == pytest.approx(21.0)  # mean over L > budget only, fastest repeat of each
    assert r8["speedup_eager"] == pytest.approx(63.0 / 21.0)
    assert r8["speedup_graph"] == pytest.approx(6.3)
    # Normalised by each environment's own DynamicCache step at P + B entries.
    assert r8["speedup_eager_version_normalised"] == pytest.approx((63.0 / 50.0) / (21.0 / 40.0))
    assert r8["kvpress_peak_entries"] == 4608 and r8["slide_peak_entries"] == 4096 + 512 + 1
    # No Slide row at batch 16: nothing invented.
    assert r16["slide_ms"] is None and r16["speedup_eager"] is None
    assert "speedup_eager_version_normalised" not in r16


def test_markdown_lists_comparison():
    result = _kv_result()
    for p in result["points"]:
        p.update(interval=128, target=4480, steps=128, warmup=2, ms_median=p["ms_mean"], ms_min=p["ms_mean"],
                 ms_max=p["ms_mean"], held_min=4480, held_max=4607, held_mean=4543.5, cuts=1, peak_allocated=None)
    result.update(env=dict(device="cpu", torch="x", transformers="5.2.0", kvpress="0.5.5", command="c"),
                  settings=dict(prompt=4096, budget=512, windows=1, warmup=2), errors=[], compare_with="d.json")
    result["comparison"] = decode_kvpress.compare(result, _decode_json())
    md = decode_kvpress.markdown(result)
    assert "| kvpress-knorm-i128 | 8 | 63.00 | 21.00 | 10.00 | 3.00 | 6.30 |" in md
