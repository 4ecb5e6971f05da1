"""A small dump of held-out embeddings, WORKDIR/embeddings.npz, for the
embedding scatter of `ito_jax.plots` and the notebook's modality-gap picture.

It holds the first `limit` examples of the eval split (config
`eval.embeddings_limit`; 0: all of it), each image with its
first caption: `image` [n, E] f32, `text` [n, E] f32 (row i of each is a true
pair), `labels` [n] i32. Written with np.savez (no pickled objects) through
epath, so the workdir may be a gs:// path.
"""

from __future__ import annotations

import io

import numpy as np
from etils import epath

KEYS = ("image", "text", "labels")


def held_out(emb: dict, eval_data: dict, rows: np.ndarray, limit: int) -> dict[str, np.ndarray]:
  """The arrays of embeddings.npz, taken from an evaluation's embeddings
  instead of embedding the split again: the first `limit` captioned eval
  examples (0: all of them), each image with its first caption.

  emb: `Evaluator.embed` output (image [E, D] for every example, caption
  [R, C, D] for the captioned rows `rows` [R] of eval_data); eval_data:
  `pipeline.eval_arrays` output."""
  rows = rows if limit == 0 else rows[:limit]  # [n]
  n = len(rows)
  return {"image": emb["image"][rows], "text": emb["caption"][:n, 0],
          "labels": np.asarray(eval_data["labels"][rows], np.int32)}


def save(path, arrays: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **{k: arrays[k] for k in KEYS})
  epath.Path(path).write_bytes(buffer.getvalue())


def load(path) -> dict[str, np.ndarray]:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: training writes it at the end of a run "
        "(ito_jax.train.train_and_evaluate)")
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
    missing = [k for k in KEYS if k not in f]
    if missing:
      raise ValueError(f"{path}: missing arrays {missing}; expected {list(KEYS)}")
    return {k: f[k] for k in KEYS}
