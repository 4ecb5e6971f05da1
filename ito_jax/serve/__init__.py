"""Serving an export: image and text embeddings, zero-shot classifiers.

  from ito_jax import serve
  embedder = serve.load("workdirs/demo/export")
  image_emb = embedder.embed_images(["cat.png", pil_image, uint8_array])   # [n, D]
  text_emb = embedder.embed_texts(["a red circle", "a blue square"])       # [n, D]
  classifier = embedder.zero_shot_classifier(["red circle", "blue square"])
  classifier.predict(["cat.png"])                                           # ["red circle"]

Embeddings are float32 and L2-normalised, so a dot product is a cosine.
Images are preprocessed as evaluation does: decoded to RGB by the same function
(`ito_jax.data.records.decode_image`), the whole frame resized (bilinear) to
the model's square resolution, mapped to [-1, 1]. Inputs run in padded
batches of power-of-two sizes up to `max_batch`, so a handful of compiled
shapes serve every request size.

Command line (`python -m ito_jax.serve --help`): `embed` (files to .npy),
`http` (a JSON embedding service on 127.0.0.1), `loadtest`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ito_jax import export as export_lib
from ito_jax.cli import UserError, template_problem
from ito_jax.data import augment, records


class InputError(UserError, ValueError):
  """An input the embedder cannot take; the message names which one and why."""


def bucket(n: int, max_batch: int) -> int:
  """Smallest power of two >= n, capped at max_batch."""
  return min(max_batch, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class ZeroShotClassifier:
  classnames: list[str]
  weights: np.ndarray  # [classes, D], L2-normalised mean of the template embeddings
  embedder: "Embedder"

  def __array__(self, dtype=None, copy=None):
    """np.asarray(classifier) is its [classes, D] weight matrix."""
    del copy
    return np.asarray(self.weights, dtype=dtype)

  def logits(self, images) -> np.ndarray:
    """Cosine similarities [n, classes]."""
    return self.embedder.embed_images(images) @ self.weights.T

  def predict(self, images) -> list[str]:
    return [self.classnames[i] for i in np.argmax(self.logits(images), axis=-1)]


def check_texts(texts: Sequence[str]) -> None:
  """Raises InputError naming the first text that is not a non-empty string
  of valid Unicode (a lone surrogate, which JSON escapes can spell, would
  reach the tokenizer as an opaque error)."""
  if isinstance(texts, str):
    raise InputError("texts must be a list of strings, not one string")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise InputError(f"texts[{i}]: expected a string, got {type(text).__name__}")
    if not text.strip():
      raise InputError(f"texts[{i}] is empty")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise InputError(f"texts[{i}] is not valid Unicode: a lone surrogate "
                       f"{text[e.start]!r} at character {e.start}") from None


class Embedder:
  """An exported dual encoder on the default device (see the module docstring)."""

  def __init__(self, exported: export_lib.Export, max_batch: int = 64):
    if max_batch < 1:
      raise InputError(f"max_batch must be >= 1, got {max_batch}")
    self.model_config = exported.model_config
    self.tokenizer = exported.tokenizer
    self.manifest = exported.manifest
    self.max_batch = max_batch
    self.image_size = self.model_config.image.image_size
    self.eval_resize = self.model_config.image.eval_resize
    self.context_length = self.model_config.text.context_length
    self.embed_dim = self.model_config.embed_dim
    graphdef, state = nnx.split(exported.model)
    self._state = state
    self._encode_image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
    self._encode_text = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_text(t))

  # ---- preprocessing: anything image-like -> float32 [H, W, 3] in [-1, 1] ----
  def preprocess_image(self, image, name: str = "image",
                       max_pixels: int = records.Limits.max_image_pixels) -> np.ndarray:
    """A path, PIL image, encoded bytes, uint8 array [H, W, 3] (any size), or a
    float array already in model form ([S, S, 3] in [-1, 1]).

    Files, bytes and PIL images go to RGB exactly as training and evaluation
    decode them (`records.decode_image`: 16-bit grey rescaled, transparency on
    white, EXIF orientation applied); files and bytes above `max_pixels` are
    refused before decoding."""
    if isinstance(image, (str, os.PathLike)):
      try:
        with open(image, "rb") as f:
          image = f.read()
      except OSError as e:
        raise InputError(f"{name}: cannot read image file {os.fspath(image)!r}: {e}") from e
    if isinstance(image, (bytes, bytearray)):
      try:
        image, _ = records.decode_image(bytes(image), max_pixels)
      except records.BadRecord as e:
        if e.kind == "image_too_large":
          raise InputError(f"{name}: image too large ({e.detail})") from e
        raise InputError(f"{name}: not a decodable image ({e})") from e
    elif isinstance(image, Image.Image):
      try:
        image.load()
        image, _ = records.to_rgb(records.upright(image))
      except (records.BadRecord, OSError, ValueError) as e:
        raise InputError(f"{name}: not a decodable image ({e})") from e
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
      raise InputError(f"{name}: expected an RGB image [H, W, 3], got shape {array.shape}")
    if array.dtype == np.uint8:
      return augment.to_unit_range(augment.resize(array, self.image_size, self.eval_resize))
    if np.issubdtype(array.dtype, np.floating):
      s = self.image_size
      if array.shape != (s, s, 3):
        raise InputError(f"{name}: float images must be preprocessed to [{s}, {s}, 3], "
                         f"got {array.shape}; pass uint8 for automatic resizing")
      if not np.all(np.isfinite(array)) or array.min() < -1.0 or array.max() > 1.0:
        raise InputError(f"{name}: float images must lie in [-1, 1] (uint8 [0, 255] is "
                         f"rescaled automatically)")
      return array.astype(np.float32)
    raise InputError(f"{name}: unsupported dtype {array.dtype}; use uint8 or float")

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    check_texts(texts)
    # As training's captions were (records.parse): "a\x85b" tokenizes as "a b".
    texts = [records.normalize_whitespace(t) for t in texts]
    return self.tokenizer.encode_batch(texts, self.context_length)  # [n, L]

  # ---- model calls on already-preprocessed batches ---------------------------
  def _run(self, fn, array: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(array), self.max_batch):
      chunk = array[start:start + self.max_batch]
      n, size = len(chunk), bucket(len(chunk), self.max_batch)
      if size > n:  # pad with copies of the last row; one compiled shape per bucket
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
      out.append(np.asarray(fn(self._state, jnp.asarray(chunk)))[:n])
    if not out:
      return np.zeros((0, self.embed_dim), np.float32)
    return np.concatenate(out)

  def embed_preprocessed_images(self, images: np.ndarray) -> np.ndarray:
    """float32 [n, S, S, 3] in [-1, 1] -> [n, D]."""
    return self._run(self._encode_image, images)

  def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
    """int32 [n, L] -> [n, D]."""
    return self._run(self._encode_text, tokens)

  def warmup(self) -> None:
    """Compiles every batch bucket of both towers, so first requests are not slow."""
    size = 1
    while True:
      self.embed_preprocessed_images(np.zeros((size, self.image_size, self.image_size, 3), np.float32))
      self.embed_tokens(np.full((size, self.context_length), 2, np.int32))  # EOS only
      if size >= self.max_batch:
        return
      size = bucket(size + 1, self.max_batch)

  # ---- the API ----------------------------------------------------------------
  def embed_images(self, images) -> np.ndarray:
    """A batch array [n, H, W, 3] or an iterable of images (see
    preprocess_image) -> float32 [n, D]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      items = list(images)
    elif isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
      items = [images]
    else:
      items = list(images)
    batch = [self.preprocess_image(x, f"images[{i}]") for i, x in enumerate(items)]
    if not batch:
      return np.zeros((0, self.embed_dim), np.float32)
    return self.embed_preprocessed_images(np.stack(batch))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """List of strings -> float32 [n, D]."""
    return self.embed_tokens(self.tokenize(texts))

  def zero_shot_classifier(self, classnames: Iterable[str],
                           templates: Sequence[str] | None = None) -> ZeroShotClassifier:
    """Class embeddings from prompts: each template formatted with each class
    name, embedded, averaged per class and renormalised. Templates default to
    the ones the run evaluated with."""
    classnames = list(classnames)
    templates = list(templates if templates is not None else self.manifest.get("templates") or ["{}"])
    if not classnames:
      raise InputError("classnames is empty")
    if not templates:
      raise InputError("templates is empty")
    problems = [p for p in map(template_problem, templates) if p]
    if problems:
      raise InputError(f"template {problems[0]}")
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = self.embed_texts(prompts).reshape(len(classnames), len(templates), -1)
    mean = emb.mean(axis=1)
    return ZeroShotClassifier(classnames, mean / np.linalg.norm(mean, axis=-1, keepdims=True), self)


def load(export_dir: str, max_batch: int = 64) -> Embedder:
  """Validates and loads an export (see ito_jax.export.load for the checks)."""
  return Embedder(export_lib.load(export_dir), max_batch=max_batch)
