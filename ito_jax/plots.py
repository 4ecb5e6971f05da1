"""PNG pictures of a run.

  python -m ito_jax.plots --workdir=DIR [--out=DIR/plots]

Reads WORKDIR/metrics.jsonl (training lines every log_every_steps, eval lines
every eval_every_steps) and WORKDIR/embeddings.npz (written at the end of
training) and writes:

  loss.png           total loss and its parts (loss/align, loss/itm, loss/anchor)
  learning_rate.png  the schedule actually applied
  temperature.png    1 / logit scale
  gap.png            modality gap: centroid distance on training batches and held out
  saturation.png     share of saturated positives (p > 0.99) and mean logit margin
  embeddings.png     2-D PCA of held-out image and text embeddings

Paths go through etils.epath (DIR may be gs://...). Figures are drawn on
matplotlib's Agg canvas without pyplot, so no display is needed; the
functions return Figures for notebooks (`to_png` gives their bytes).
"""

from __future__ import annotations

import io
import math

import numpy as np
from absl import app, flags
from etils import epath
from matplotlib.figure import Figure

from ito_jax import cli
from ito_jax.evaluate import embeddings as embeddings_lib
from ito_jax.evaluate import gap
from ito_jax.metrics import read_jsonl

IMAGE_COLOR, TEXT_COLOR = "tab:blue", "tab:orange"

# file name -> (title, y label, [(metrics key, legend label)]); the first key is drawn solid
CURVES = {
    "loss": ("Training loss", "loss",
             [("loss", "total"), ("loss/align", "align"), ("loss/itm", "ITM"),
              ("loss/anchor", "fused anchor")]),
    "learning_rate": ("Learning rate", "learning rate", [("learning_rate", None)]),
    "temperature": ("Temperature", "1 / logit scale", [("temperature", None)]),
    "gap": ("Modality gap", "‖mean(image) − mean(text)‖",
            [("gap/batch_centroid_distance", "training batch"),
             ("gap/centroid_distance", "held out (eval)")]),
}
# (metrics key, panel title, y label, y limits)
SATURATION = [("saturation/frac_positive_prob_gt_099", "share of positives with p > 0.99",
               "share of batch", (-0.02, 1.02)),
              ("saturation/mean_margin", "mean margin: positive − hardest negative",
               "logit", None)]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records that logged a finite scalar `key`."""
  points = [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  steps, values = zip(*points) if points else ((), ())
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def _plot_series(ax, records, keys) -> bool:
  drawn = False
  for i, (key, label) in enumerate(keys):
    steps, values = series(records, key)
    if len(steps):
      ax.plot(steps, values, linestyle="-" if i == 0 else "--",
              marker="o" if len(steps) < 20 else None, markersize=3, label=label or key)
      drawn = True
  return drawn


def curve_figure(records: list[dict], name: str) -> Figure | None:
  """One of CURVES as a figure, or None when the run logged none of its keys."""
  title, ylabel, keys = CURVES[name]
  fig = Figure(figsize=(6, 3.6), layout="constrained")
  ax = fig.add_subplot()
  if not _plot_series(ax, records, keys):
    return None
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  if sum(len(series(records, k)[0]) > 0 for k, _ in keys) > 1:
    ax.legend()
  ax.grid(alpha=0.3)
  return fig


def saturation_figure(records: list[dict]) -> Figure | None:
  fig = Figure(figsize=(10, 3.6), layout="constrained")
  drawn = False
  for i, (key, title, ylabel, ylim) in enumerate(SATURATION):
    ax = fig.add_subplot(1, 2, i + 1)
    drawn |= _plot_series(ax, records, [(key, None)])
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if ylim:
      ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
  fig.suptitle("Saturation on training batches (image → text, view 0)")
  return fig if drawn else None


def pca_2d(image: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Projects L2-normalised image [n, E] and text [m, E] embeddings onto the two
  leading principal axes of the two sets pooled (centred on the pooled mean),
  so a modality gap shows as two separate clouds. Returns ([n, 2], [m, 2])."""
  image, text = (np.asarray(x, np.float64) for x in (image, text))
  if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
    raise ValueError(f"pca_2d needs [n, E] and [m, E] arrays, got {image.shape} and {text.shape}")
  image, text = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                 for x in (image, text))
  pooled = np.concatenate([image, text])
  mean = pooled.mean(axis=0)
  _, _, vt = np.linalg.svd(pooled - mean, full_matrices=False)
  axes = vt[:2].T  # [E, 2]
  return (image - mean) @ axes, (text - mean) @ axes


def embedding_figure(image: np.ndarray, text: np.ndarray, title: str = "Held-out embeddings",
                     ax=None, num_pairs: int = 40) -> Figure:
  """Scatter of pca_2d(image, text); thin lines join the first `num_pairs`
  true pairs (row i of image and text). Draws into `ax` when given."""
  fig = None
  if ax is None:
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
  image_xy, text_xy = pca_2d(image, text)
  for (x0, y0), (x1, y1) in zip(image_xy[:num_pairs], text_xy[:num_pairs]):
    ax.plot([x0, x1], [y0, y1], color="0.75", linewidth=0.5, zorder=1)
  ax.scatter(*image_xy.T, s=8, color=IMAGE_COLOR, label="image", zorder=2)
  ax.scatter(*text_xy.T, s=8, color=TEXT_COLOR, label="text", zorder=2)
  for xy, color in ((image_xy, IMAGE_COLOR), (text_xy, TEXT_COLOR)):
    ax.scatter(*xy.mean(axis=0), s=160, marker="X", color=color, edgecolor="black", zorder=3)
  ax.set(title=f"{title}\ncentroid distance {gap.centroid_distance(image, text):.3f}",
         xlabel="PC 1", ylabel="PC 2")
  ax.set_aspect("equal", adjustable="datalim")
  ax.legend(loc="best")
  return fig if fig is not None else ax.figure


def to_png(fig: Figure, dpi: int = 110) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  return buffer.getvalue()


def write_all(workdir, out=None) -> tuple[list[epath.Path], list[str]]:
  """Writes every picture the run has data for into `out` (default WORKDIR/plots).
  Returns (paths written, reasons for the ones skipped)."""
  workdir = epath.Path(workdir)
  metrics_path = workdir / "metrics.jsonl"
  if not metrics_path.exists():
    raise FileNotFoundError(f"{metrics_path} does not exist: is --workdir a training run's workdir?")
  records = read_jsonl(metrics_path)
  out = epath.Path(out) if out else workdir / "plots"
  out.mkdir(parents=True, exist_ok=True)
  figures = {name: curve_figure(records, name) for name in CURVES}
  figures["saturation"] = saturation_figure(records)
  skipped = [f"{name}.png: {metrics_path} logs none of "
             f"{[k for k, *_ in (SATURATION if name == 'saturation' else CURVES[name][2])]}"
             for name, fig in figures.items() if fig is None]
  emb_path = workdir / "embeddings.npz"
  if emb_path.exists():
    emb = embeddings_lib.load(emb_path)
    figures["embeddings"] = embedding_figure(emb["image"], emb["text"])
  else:
    skipped.append(f"embeddings.png: {emb_path} does not exist (written at the end of training)")
  written = []
  for name, fig in figures.items():
    if fig is not None:
      path = out / f"{name}.png"
      path.write_bytes(to_png(fig))
      written.append(path)
  return written, skipped


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  written, skipped = write_all(flags.FLAGS.workdir, flags.FLAGS.out or None)
  for path in written:
    print(f"wrote {path}")
  for reason in skipped:
    print(f"skipped {reason}")


if __name__ == "__main__":
  # Defined here, not at import: ito_jax.main defines --workdir too, and a
  # notebook or test imports both modules.
  flags.DEFINE_string("workdir", None, "A training run's workdir (local or gs://).")
  flags.DEFINE_string("out", "", "Where the PNGs go; default WORKDIR/plots.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
