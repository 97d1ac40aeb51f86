"""The notebooks run top to bottom (nbclient, a fresh kernel, the repository as working directory), with their
`parameters` cell set to a tiny budget; their own asserts check what they show."""

import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_device(monkeypatch):
  """A kernel as Colab starts it: one CPU device (not the 8 virtual devices of conftest)."""
  monkeypatch.setenv("XLA_FLAGS", "")


def _run(name: str, parameters: str) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{name}: one cell tagged 'parameters'"
  cells[0].source = parameters
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  return nb


def _text(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_notebook(tmp_path):
  nb = _run("quickstart.ipynb", f"STEPS = 3\nEVAL_SAMPLES = 32\nWORKDIR = {str(tmp_path)!r}")
  assert "recall " in _text(nb) and os.path.exists(tmp_path / "learning_curves.png")
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", []))  # the read-mass figure


def test_hf_llama_notebook(tmp_path):
  pytest.importorskip("transformers")
  nb = _run("hf_llama.ipynb", f"STEPS = 2\nWORKDIR = {str(tmp_path)!r}")
  assert "max |lm2-jax - transformers|" in _text(nb)
  assert os.path.exists(tmp_path / "export" / "params") and os.path.exists(tmp_path / "hf_with_memory" / "memory.safetensors")


def test_sessions_notebook(tmp_path):
  nb = _run("sessions.ipynb", f"STEPS = 3\nSLEEP_STEPS = 2\nWORKDIR = {str(tmp_path)!r}")
  text = _text(nb)
  assert "right after injecting" in text and "memory empty" in text and "kl_after" in text
