"""ito_jax.plots: the PCA projection, the series it draws, and the PNGs it writes."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from ito_jax import plots
from ito_jax.evaluate import embeddings
from ito_jax.metrics import MetricsWriter, read_jsonl
from tests.fake_gcs import fake_gcs  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pca_2d_is_an_isometry_on_a_great_circle():
  """Unit vectors in one 2-D plane through the origin: centring keeps them in
  the plane, so the 2-D projection must keep every pairwise distance."""
  rng = np.random.default_rng(0)
  plane, _ = np.linalg.qr(rng.normal(size=(16, 2)))  # [E, 2] orthonormal
  angles = rng.uniform(0, 2 * np.pi, size=30)
  points = np.stack([np.cos(angles), np.sin(angles)], 1) @ plane.T  # [30, E], unit rows
  image_xy, text_xy = plots.pca_2d(points[:12], points[12:])
  projected = np.concatenate([image_xy, text_xy])

  def distances(x):
    return np.linalg.norm(x[:, None] - x[None], axis=-1)

  np.testing.assert_allclose(distances(projected), distances(points), atol=1e-9)


def test_pca_2d_puts_a_modality_gap_on_the_first_axis():
  rng = np.random.default_rng(1)
  gap_dir = np.eye(32)[0]
  image = unit(3 * gap_dir + rng.normal(size=(50, 32)) * 0.3)
  text = unit(-3 * gap_dir + rng.normal(size=(50, 32)) * 0.3)
  image_xy, text_xy = plots.pca_2d(image, text)
  side = np.sign(image_xy[0, 0])
  assert np.all(np.sign(image_xy[:, 0]) == side) and np.all(np.sign(text_xy[:, 0]) == -side)
  # The centroid gap lies (almost) along PC 1, so the projected gap is the gap.
  projected_gap = np.linalg.norm(image_xy.mean(0) - text_xy.mean(0))
  assert projected_gap == pytest.approx(np.linalg.norm(image.mean(0) - text.mean(0)), rel=0.02)


def test_pca_2d_centres_before_finding_axes():
  """Embeddings in a narrow cone (a large shared offset 5 e0, as CLIP's are)
  with a gap of +-1.5 e1: after centring, the gap, not the offset, is PC 1,
  so the modalities fall on opposite signs of it."""
  rng = np.random.default_rng(1)
  e = np.eye(32)
  image = unit(5 * e[0] + 1.5 * e[1] + rng.normal(size=(50, 32)) * 0.3)
  text = unit(5 * e[0] - 1.5 * e[1] + rng.normal(size=(50, 32)) * 0.3)
  image_xy, text_xy = plots.pca_2d(image, text)
  side = np.sign(image_xy[0, 0])
  assert np.all(np.sign(image_xy[:, 0]) == side) and np.all(np.sign(text_xy[:, 0]) == -side)


def test_pca_2d_names_bad_shapes():
  with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 5\)"):
    plots.pca_2d(np.ones((4, 3)), np.ones((4, 5)))


def ito_run(workdir):
  """A small run's files: training lines every 10 steps, eval lines every 20."""
  with MetricsWriter(workdir, tensorboard=False) as writer:
    for step in range(10, 61, 10):
      writer.write(step, {"loss": 5.0 - step / 20, "loss/align": 4.0 - step / 20, "loss/itm": 0.7,
                          "learning_rate": step * 1e-4, "temperature": 0.07,
                          "gap/batch_centroid_distance": 1.0 / step,
                          "saturation/frac_positive_prob_gt_099": step / 100,
                          "saturation/mean_margin": float("nan") if step == 30 else -1.0 + step / 60})
      if step % 20 == 0:
        writer.write(step, {"gap/centroid_distance": 2.0 / step, "zeroshot/accuracy": 0.1})
  rng = np.random.default_rng(0)
  embeddings.save(epath.Path(workdir) / "embeddings.npz",
                  {"image": unit(rng.normal(size=(40, 8))).astype(np.float32),
                   "text": unit(rng.normal(size=(40, 8))).astype(np.float32),
                   "labels": np.arange(40, dtype=np.int32)})


def test_series_reads_eval_lines_and_skips_non_finite(tmp_path):
  ito_run(tmp_path)
  records = read_jsonl(tmp_path / "metrics.jsonl")
  steps, values = plots.series(records, "gap/centroid_distance")
  np.testing.assert_array_equal(steps, [20, 40, 60])
  np.testing.assert_allclose(values, [0.1, 0.05, 2 / 60])
  steps, _ = plots.series(records, "saturation/mean_margin")
  np.testing.assert_array_equal(steps, [10, 20, 40, 50, 60])  # the NaN at 30 is left out
  assert plots.series(records, "loss/anchor")[0].size == 0


def test_loss_figure_draws_the_logged_parts_only(tmp_path):
  ito_run(tmp_path)
  records = read_jsonl(tmp_path / "metrics.jsonl")
  (ax,) = plots.curve_figure(records, "loss").axes
  lines = {line.get_label(): line for line in ax.get_lines()}
  assert set(lines) == {"total", "align", "ITM"}  # no anchor loss was logged
  np.testing.assert_allclose(lines["total"].get_ydata(), [5.0 - s / 20 for s in range(10, 61, 10)])


def png_size(data: bytes) -> tuple[int, int]:
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", data[16:24])


def test_write_all_writes_every_picture(tmp_path):
  ito_run(tmp_path)
  written, skipped = plots.write_all(tmp_path)
  assert skipped == []
  names = sorted(p.name for p in written)
  assert names == sorted(f"{n}.png" for n in
                         ["loss", "learning_rate", "temperature", "gap", "saturation", "embeddings"])
  for path in written:
    assert path.parent == epath.Path(tmp_path) / "plots"
    width, height = png_size(path.read_bytes())
    assert width >= 400 and height >= 300, (path.name, width, height)


def test_write_all_says_what_it_skipped_and_why(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(10, {"loss": 1.0})
  written, skipped = plots.write_all(tmp_path, tmp_path / "out")
  assert [p.name for p in written] == ["loss.png"]
  assert any(s.startswith("temperature.png:") and "'temperature'" in s for s in skipped)
  assert any(s.startswith("embeddings.png:") and "does not exist" in s for s in skipped)
  with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
    plots.write_all(tmp_path / "nothing")


def test_write_all_to_gs(fake_gcs, tmp_path):
  ito_run(tmp_path)
  written, _ = plots.write_all(tmp_path, "gs://bucket/plots")
  assert sorted(fake_gcs) == sorted(f"/bucket/plots/{p.name}" for p in written) and len(written) == 6


def test_command_line(tmp_path):
  ito_run(tmp_path)
  result = subprocess.run([sys.executable, "-m", "ito_jax.plots", f"--workdir={tmp_path}",
                           f"--out={tmp_path / 'pics'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert f"wrote {tmp_path / 'pics' / 'embeddings.png'}" in result.stdout.splitlines()
  assert len(list((tmp_path / "pics").glob("*.png"))) == 6
