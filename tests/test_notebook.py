"""Execute notebooks/01_alanine_dipeptide.ipynb end to end (slow: about a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_alanine_dipeptide.ipynb"


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("OFM_NOTEBOOK_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"fes_mse", "js_divergence", "kl_divergence"}
    assert 0.0 <= metrics["js_divergence"] <= 0.6932
    assert (tmp_path / "phi_psi.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "simulation").glob("replica_*.dcd"))) == 2
