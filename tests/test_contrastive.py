"""Contrastive losses against plain NumPy references and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ito_jax.losses import contrastive


def normalized(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def clip_reference(img, txt, scale):
  """Symmetric InfoNCE, written the way the CLIP paper's pseudo-code reads."""
  logits = scale * img @ txt.T
  labels = np.arange(len(img))
  i2t = -log_softmax(logits, 1)[labels, labels].mean()
  t2i = -log_softmax(logits, 0)[labels, labels].mean()
  return (i2t + t2i) / 2


def siglip_reference(img, txt, scale, bias):
  logits = scale * img @ txt.T + bias
  z = 2 * np.eye(len(img)) - 1
  return np.sum(np.log1p(np.exp(-z * logits))) / len(img)


def multi_positive_reference(img, txt, scale):
  """img [B, M, D], txt [B, N, D]: loops over anchors and their positives."""
  b, m, _ = img.shape
  n = txt.shape[1]
  rows, cols = img.reshape(b * m, -1), txt.reshape(b * n, -1)
  logits = scale * rows @ cols.T
  i2t = [np.mean([-log_softmax(logits[r], 0)[i * n + k] for k in range(n)])
         for i in range(b) for r in [i * m + j for j in range(m)]]
  t2i = [np.mean([-log_softmax(logits[:, c], 0)[i * m + k] for k in range(m)])
         for i in range(b) for c in [i * n + j for j in range(n)]]
  return (np.mean(i2t) + np.mean(t2i)) / 2


def multi_sigmoid_reference(img, txt, scale, bias):
  b, m, _ = img.shape
  n = txt.shape[1]
  total = 0.0
  for i in range(b):
    for j in range(m):
      for k in range(b):
        for l in range(n):
          z = 1.0 if i == k else -1.0
          total += np.log1p(np.exp(-z * (scale * img[i, j] @ txt[k, l] + bias)))
  return total / (b * m)


def test_softmax_single_view_is_clip():
  rng = np.random.default_rng(0)
  img, txt = normalized(rng, 8, 16), normalized(rng, 8, 16)
  got = contrastive.softmax_loss(jnp.asarray(img[:, None]), jnp.asarray(txt[:, None]), 10.0)
  np.testing.assert_allclose(got, clip_reference(img, txt, 10.0), rtol=1e-5)


def test_sigmoid_single_view_is_siglip():
  rng = np.random.default_rng(1)
  img, txt = normalized(rng, 8, 16), normalized(rng, 8, 16)
  got = contrastive.sigmoid_loss(jnp.asarray(img[:, None]), jnp.asarray(txt[:, None]), 10.0, -10.0)
  np.testing.assert_allclose(got, siglip_reference(img, txt, 10.0, -10.0), rtol=1e-5)


@pytest.mark.parametrize("m,n", [(2, 3), (3, 1)])
def test_multi_view_losses_match_reference(m, n):
  rng = np.random.default_rng(2)
  img, txt = normalized(rng, 5, m, 8), normalized(rng, 5, n, 8)
  got = contrastive.softmax_loss(jnp.asarray(img), jnp.asarray(txt), 7.0)
  np.testing.assert_allclose(got, multi_positive_reference(img, txt, 7.0), rtol=1e-5)
  got = contrastive.sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), 7.0, -3.0)
  np.testing.assert_allclose(got, multi_sigmoid_reference(img, txt, 7.0, -3.0), rtol=1e-5)


def test_multi_view_with_identical_views_differs_only_by_positive_count():
  """Duplicating a view keeps the positive set's geometry. With perfectly
  aligned, well-separated embeddings the loss tends to the log of the number
  of positives per anchor (they share the probability mass), and the same
  views paired wrongly cost far more, so the floor is not a constant."""
  eye = np.eye(4)
  img = np.repeat(eye[:, None], 2, axis=1)  # [4, 2, 4], identical views
  txt = np.repeat(eye[:, None], 3, axis=1)  # [4, 3, 4]
  got = float(contrastive.softmax_loss(jnp.asarray(img), jnp.asarray(txt), 100.0))
  expected = 0.5 * (np.log(3) + np.log(2))
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  # Each image's texts are another sample's: its positives have similarity 0,
  # another caption 1, so at scale 100 the loss is about 100.
  wrong = float(contrastive.softmax_loss(jnp.asarray(img), jnp.asarray(np.roll(txt, 1, axis=0)), 100.0))
  assert wrong > 50 * expected, (wrong, expected)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_gradients_match_finite_differences(name):
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    img = jnp.asarray(normalized(rng, 4, 2, 6))
    txt = jnp.asarray(normalized(rng, 4, 3, 6))
    scale, bias = jnp.float64(5.0), jnp.float64(-2.0)

    def f(img, txt, scale, bias):
      return contrastive.alignment_loss(name, img, txt, scale, bias)

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
    eps = 1e-6
    for arg_index, arg in enumerate((img, txt, scale, bias)):
      if name == "softmax" and arg_index == 3:
        assert float(grads[3]) == 0.0  # the softmax loss ignores the bias
        continue
      direction = jnp.asarray(rng.normal(size=np.shape(arg)))
      args_plus = [img, txt, scale, bias]
      args_minus = [img, txt, scale, bias]
      args_plus[arg_index] = arg + eps * direction
      args_minus[arg_index] = arg - eps * direction
      numeric = (f(*args_plus) - f(*args_minus)) / (2 * eps)
      analytic = jnp.sum(grads[arg_index] * direction)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_unknown_loss_name_is_rejected():
  with pytest.raises(ValueError, match="loss.name"):
    contrastive.alignment_loss("hinge", jnp.zeros((2, 1, 3)), jnp.zeros((2, 1, 3)), 1.0, 0.0)
