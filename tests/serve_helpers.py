"""What the serving tests share: test images in the forms serving takes, and
an Embedder without a model for its preprocessing alone."""

import base64
import io

import numpy as np
from PIL import Image

from ito_jax import serve


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def random_images(n, size=48, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
  return png_bytes_of(Image.fromarray(image))


def png_bytes_of(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def preprocessing_only(image_size=20, eval_resize='squash'):
  """An Embedder without a model: enough for its preprocessing."""
  bare = serve.Embedder.__new__(serve.Embedder)
  bare.image_size = image_size
  bare.eval_resize = eval_resize
  return bare
