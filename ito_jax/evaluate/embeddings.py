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

from ito_jax.evaluate.evaluator import _embed_images, _embed_texts, embed_in_batches

KEYS = ("image", "text", "labels")


def compute(model, eval_data: dict, batch_size: int, limit: int) -> dict[str, np.ndarray]:
  """Embeds the first `limit` captioned eval images and their first captions
  (0: all of them); examples without a caption have no pair and are left out.

  eval_data: `pipeline.eval_arrays` output (images [E, H, W, 3], tokens [E, C, L],
  labels [E], optionally captioned [E])."""
  rows = np.flatnonzero(eval_data.get("captioned", np.ones(len(eval_data["images"]), bool)))
  rows = rows if limit == 0 else rows[:limit]  # [n]
  return {
      "image": embed_in_batches(_embed_images, model, eval_data["images"][rows], batch_size),
      "text": embed_in_batches(_embed_texts, model, eval_data["tokens"][rows, 0], batch_size),
      "labels": np.asarray(eval_data["labels"][rows], np.int32),
  }


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
