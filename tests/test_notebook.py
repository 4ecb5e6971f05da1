"""launch/colab/ito_demo.ipynb runs top to bottom (nbclient, a real kernel)."""

import base64
import json
import os
import struct

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab", "ito_demo.ipynb")


def png_outputs(cell):
  return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
          if "image/png" in o.get("data", {})]


def text_output(cell):
  return "".join(o["text"] for o in cell.get("outputs", [])
                 if o["output_type"] == "stream" and o["name"] == "stdout")


def cell_with(nb, needle):
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
  return cell


@pytest.mark.slow
def test_demo_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / "demo"
  monkeypatch.setenv("ITO_DEMO_WORKDIR", str(workdir))  # the kernel inherits it
  # The kernel trains for a while: XLA's default flags, not the suite's fast
  # compilation (tests/conftest.py), as on a user's runtime.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"
  assert "parameters" in nb.cells[1].metadata.get("tags", [])
  # Raises CellExecutionError naming the cell if any cell fails. The kernel
  # starts in the notebook's folder, as Jupyter and `jupyter execute` start it.
  try:
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  finally:  # kept under pytest's basetemp for a look at what the notebook showed
    nbformat.write(nb, tmp_path / "executed.ipynb")

  # The install cell found the checkout above launch/colab and installed nothing.
  assert text_output(cell_with(nb, "find_spec")).strip() == f"ito_jax from {ROOT}/ito_jax"
  # Both runs trained, evaluated and left their files.
  evals = {}
  for run in ("baseline", "ito"):
    for name in ("metrics.jsonl", "eval.json", "embeddings.npz", "plots/gap.png"):
      assert (workdir / run / name).exists(), (run, name)
    evals[run] = json.loads((workdir / run / "eval.json").read_text())
  table = text_output(cell_with(nb, "rows = ["))
  line = next(l for l in table.splitlines() if l.startswith("gap/centroid_distance"))
  assert [float(x) for x in line.split()[1:]] == pytest.approx(
      [evals["baseline"]["gap/centroid_distance"], evals["ito"]["gap/centroid_distance"]], abs=1e-3)
  # What the notebook shows: ITO's held-out modality gap is smaller.
  assert evals["ito"]["gap/centroid_distance"] < evals["baseline"]["gap/centroid_distance"]
  # Pictures: curves, the two gap scatters, retrieval through the served export.
  for needle in ("loss/align", "embedding_figure", "serve.load"):
    (png,) = png_outputs(cell_with(nb, needle))
    width, height = struct.unpack(">II", png[16:24])
    assert width > 600 and height > 300, (needle, width, height)
  served = text_output(cell_with(nb, "serve.load"))
  assert served.startswith("served encoders: image->caption R@1 over 128 held-out captions")
