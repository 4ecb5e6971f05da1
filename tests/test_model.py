"""Towers: shapes, logical axis annotations, named sizes, scan equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, tiny_cpu
from ito_jax.models.ito import ItoModel, count_params


def tiny_model_config(**overrides):
  c = tiny_cpu.get_config("runlocal")
  c.model.update(overrides)
  return c.model


def build(model_config, seed=0):
  with nnx.use_eager_sharding(False):
    return ItoModel(model_config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
  return build(tiny_model_config())


def test_encoders_return_unit_embeddings_and_tokens(model):
  cfg = tiny_model_config()
  images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3), minval=-1, maxval=1)
  tokens = jnp.array([[5, 6, 7, 2] + [0] * 12, [9, 2] + [0] * 14, [4] * 15 + [2]], jnp.int32)
  img = model.encode_image(images)
  txt = model.encode_text(tokens)
  assert img.shape == (3, cfg.embed_dim) and txt.shape == (3, cfg.embed_dim)
  np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
  _, image_tokens = model.image_features(images)
  _, text_tokens, mask = model.text_features(tokens)
  assert image_tokens.shape == (3, (32 // cfg.image.patch_size) ** 2, cfg.image.width)
  assert text_tokens.shape == (3, 16, cfg.text.width)
  np.testing.assert_array_equal(mask.sum(axis=1), [4, 2, 16])


def test_padding_does_not_change_text_embedding(model):
  """Tokens after EOS are padding and masked out of attention, so the same
  caption unpadded, padded to 8 and padded to 16 embeds identically (an
  unmasked Block would let the real tokens attend to the pads)."""
  exact = jnp.array([[5, 6, 7, 2]], jnp.int32)  # no padding at all
  want = model.encode_text(exact)
  for length in (8, 16):
    padded = jnp.array([[5, 6, 7, 2] + [0] * (length - 4)], jnp.int32)
    np.testing.assert_allclose(model.encode_text(padded), want, atol=1e-5)
  # A different real token does change it (the comparison is not vacuous).
  other = jnp.array([[5, 9, 7, 2]], jnp.int32)
  assert float(jnp.abs(model.encode_text(other) - want).max()) > 1e-4


def test_text_pooled_is_the_eos_token(model):
  """The text tower pools the token at the last real position (EOS, index
  length - 1), not the first or the last of the padded row."""
  tokens = jnp.array([[5, 6, 7, 2] + [0] * 12, [9, 2] + [0] * 14, [4] * 15 + [2]], jnp.int32)
  pooled, x, _ = model.text_tower(tokens)
  np.testing.assert_array_equal(pooled, x[np.arange(3), np.array([3, 1, 15])])


def test_text_word_order_matters(model):
  """Swapping two words changes the embedding: the position embedding is
  added (without it the masked encoder is permutation-invariant up to EOS)."""
  a = model.encode_text(jnp.array([[5, 6, 7, 2] + [0] * 12], jnp.int32))
  b = model.encode_text(jnp.array([[6, 5, 7, 2] + [0] * 12], jnp.int32))
  assert float(jnp.abs(a - b).max()) > 1e-4


def test_image_pooled_is_the_token_mean(model):
  """The image tower pools by global average over patch tokens (GAP)."""
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  pooled, tokens = model.image_tower(images)
  np.testing.assert_allclose(pooled, tokens.mean(axis=1), atol=1e-6)


def test_image_patch_order_matters(model):
  """Swapping two patches changes the embedding: GAP over tokens is
  permutation-invariant, so only the position embedding can tell them apart."""
  p = model.image_tower.patch_size
  images = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
  swapped = images.at[:, :p, :p].set(images[:, :p, p:2 * p]).at[:, :p, p:2 * p].set(images[:, :p, :p])
  d = float(jnp.abs(model.encode_image(images) - model.encode_image(swapped)).max())
  assert d > 1e-4, d


def _zero(linear):
  linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
  linear.bias[...] = jnp.zeros_like(linear.bias[...])


def test_block_is_pre_ln_residual():
  """Block is x + attn(LN(x)) then x + mlp(LN(x)). With both branch outputs
  zeroed it is the identity (residuals kept); with one zeroed, the other reads
  LN(3x) == LN(x), so block(3x) - 3x == block(x) - x (the norm is applied)."""
  from ito_jax.models.transformer import Block, EncoderSpec

  def block():
    with nnx.use_eager_sharding(False):
      return Block(EncoderSpec(width=32, depth=1, num_heads=4), rngs=nnx.Rngs(0))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)  # [batch, length, width]
  mask = jnp.ones((2, 5), bool)
  both = block()
  _zero(both.attn.out)
  _zero(both.mlp.fc2)
  np.testing.assert_allclose(both(x, mask), x, atol=1e-6)
  for off in ("mlp", "attn"):
    b = block()
    _zero(b.mlp.fc2 if off == "mlp" else b.attn.out)
    delta = lambda s: b(s * x, mask) - s * x
    assert float(jnp.abs(delta(1.0)).max()) > 1e-3, off
    np.testing.assert_allclose(delta(3.0), delta(1.0), atol=1e-4, err_msg=off)


def test_projections_belong_to_their_tower():
  """image_proj feeds only encode_image and text_proj only encode_text:
  randomising image_proj leaves text embeddings bit-identical."""
  m = build(tiny_model_config())
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  tokens = jnp.array([[5, 6, 7, 2] + [0] * 12, [9, 2] + [0] * 14], jnp.int32)
  img, txt = m.encode_image(images), m.encode_text(tokens)
  m.image_proj.kernel[...] = jax.random.normal(jax.random.key(1), m.image_proj.kernel[...].shape)
  np.testing.assert_array_equal(m.encode_text(tokens), txt)
  assert float(jnp.abs(m.encode_image(images) - img).max()) > 1e-3
  m.text_proj.kernel[...] = jax.random.normal(jax.random.key(2), m.text_proj.kernel[...].shape)
  assert float(jnp.abs(m.encode_text(tokens) - txt).max()) > 1e-3


def test_every_matrix_parameter_has_logical_axes(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if var[...].ndim == 0:
      continue
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None, f"{path} has no logical axis names"
    assert len(axes) == var[...].ndim, f"{path}: {axes} vs shape {var[...].shape}"


def test_conv_stem_keeps_the_token_grid_and_has_logical_axes():
  cfg = tiny_model_config()
  cfg.image.update(patch_size=4, stem="conv")  # two 3x3 stride-2 layers (32 -> 64 channels), 1x1 -> 128
  model = build(cfg)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  _, tokens = model.image_features(images)
  assert tokens.shape == (2, 8 * 8, cfg.image.width)
  stem = nnx.state(model.image_tower.patch_embed, nnx.Param)
  assert [k.shape for k in jax.tree.leaves(stem)] == [
      (32,), (3, 3, 3, 32), (64,), (3, 3, 32, 64), (128,), (1, 1, 64, 128)]
  test_every_matrix_parameter_has_logical_axes(model)
  # Overlapping 3x3 kernels: one pixel reaches the stem's tokens of the patches
  # it borders, where a 4x4 patch embedding changes only its own patch's token.
  changed = images.at[:, 4, 4, :].add(0.5)  # the first pixel of patch (1, 1)
  stem_tokens = lambda x: model.image_tower.patch_embed(x).reshape(2, 64, -1)
  touched = np.flatnonzero(jnp.abs(stem_tokens(changed) - stem_tokens(images)).max(axis=(0, 2)))
  assert touched.tolist() == [0, 1, 8, 9]  # patches (0, 0), (0, 1), (1, 0), (1, 1)


@pytest.mark.parametrize("patch_size,width,message", [
    (6, 128, "power-of-two patch_size"), (4, 126, "not divisible by 4")])
def test_conv_stem_config_errors(patch_size, width, message):
  c = tiny_cpu.get_config("runlocal")
  c.model.image.update(image_size=24 if patch_size == 6 else 32, patch_size=patch_size,
                       width=width, num_heads=2, stem="conv")
  with pytest.raises(common.ConfigError, match=message):
    common.validate(c)
  c.model.image.update(patch_size=4, width=128, image_size=32, stem="convolution")
  with pytest.raises(common.ConfigError, match="model.image.stem"):
    common.validate(c)


def test_scanned_layers_have_same_parameters_and_function():
  loop = build(tiny_model_config(scan_layers=False))
  scanned = build(tiny_model_config(scan_layers=True), seed=1)
  assert count_params(loop) == count_params(scanned)
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  before = scanned.encode_image(images)
  assert float(jnp.abs(before - loop.encode_image(images)).max()) > 1e-3  # differently seeded
  # Copy the looped blocks into the stacked layout: outputs must then agree.
  loop_params = dict(nnx.to_flat_state(nnx.state(loop, nnx.Param)))
  depth = {"image_tower": loop.image_tower.encoder.spec.depth,
           "text_tower": loop.text_tower.encoder.spec.depth}
  for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    if "blocks" in path:
      i = path.index("blocks")
      layers = [loop_params[path[:i + 1] + (k,) + path[i + 1:]][...] for k in range(depth[path[0]])]
      var[...] = jnp.stack(layers)
    else:
      var[...] = loop_params[path][...]
  tokens = jnp.array([[5, 6, 2] + [0] * 13, [7, 2] + [0] * 14], jnp.int32)
  np.testing.assert_allclose(scanned.encode_image(images), loop.encode_image(images), atol=1e-5)
  np.testing.assert_allclose(scanned.encode_text(tokens), loop.encode_text(tokens), atol=1e-5)


def test_vit_b16_has_the_published_parameter_count():
  """ViT-B/16 at 224: 85.8M parameters in the image tower (Dosovitskiy et al.,
  minus the classifier head and class token). Built abstractly: no memory."""
  c = common.base_config()
  common.vit(c, "B/16")
  common.text(c, "B")
  abstract = nnx.eval_shape(lambda: build(c.model))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.image_tower, nnx.Param)))
  assert 85.5e6 < n < 86.0e6, n


def test_attention_implementations_agree():
  """einsum (the default) and jax.nn.dot_product_attention ('xla') compute the
  same masked attention from the same parameters, so the switch is speed only."""
  from ito_jax.models.transformer import Attention, EncoderSpec
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.float32)  # [batch, length, width]
  mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4], [1]]))  # [batch, length]
  outs = {}
  for impl in ("einsum", "xla"):
    with nnx.use_eager_sharding(False):
      layer = Attention(EncoderSpec(width=32, depth=1, num_heads=4, attention=impl), rngs=nnx.Rngs(0))
    outs[impl] = np.asarray(layer(x, kv_mask=mask))
  np.testing.assert_allclose(outs["einsum"], outs["xla"], rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs["einsum"][1], outs["einsum"][0])  # the mask matters


def test_einsum_attention_keeps_bf16_logits_in_float32():
  """In bf16 compute the einsum path forms its logits in float32, as
  jax.nn.dot_product_attention does: rounded to bf16 before the softmax, logits
  near 30 move by up to 0.125, and the weights by up to 13%."""
  from ito_jax.models.transformer import Attention, EncoderSpec
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 32)) * 4, jnp.bfloat16)  # large logits
  outs = {}
  for impl in ("einsum", "xla"):
    with nnx.use_eager_sharding(False):
      layer = Attention(EncoderSpec(width=32, depth=1, num_heads=4, attention=impl,
                                    dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    outs[impl] = np.asarray(layer(x), np.float32)
  logits_range = float(jnp.abs(jnp.einsum("bqhd,bkhd->bhqk", layer.query(x), layer.key(x),
                                          preferred_element_type=jnp.float32)).max()) / np.sqrt(8)
  assert logits_range > 16, logits_range  # where bf16 rounding moves a logit by >= 1/16
  np.testing.assert_allclose(outs["einsum"], outs["xla"], rtol=0, atol=1e-6)


def test_cudnn_attention_traces_with_a_padding_mask(monkeypatch):
  """The text tower's padding mask reaches cuDNN's kernel as a full
  [batch, 1, q_len, kv_len] bias, the shape jax.nn.dot_product_attention's
  cudnn path checks for. Traced only (no GPU here): JAX's cuDNN version probe
  is stubbed, so this checks shapes, not the kernel."""
  from jax._src.cudnn import fused_attention_stablehlo
  from ito_jax.models.transformer import Attention, EncoderSpec
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  with nnx.use_eager_sharding(False):
    layer = Attention(EncoderSpec(width=64, depth=1, num_heads=2, attention="cudnn",
                                  dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((2, 24, 64), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 24), jnp.bool_)
  out = jax.eval_shape(lambda x, m: layer(x, kv_mask=m), x, mask)
  assert out.shape == (2, 24, 64)


def test_patchify_is_the_patch_convolution():
  """The ViT computes its patch embedding as a matmul over patches; it must
  equal the strided convolution its nnx.Conv parameters describe, with a
  non-zero bias and inputs whose patches all differ."""
  vit = build(tiny_model_config()).image_tower
  vit.patch_embed.bias[...] = jax.random.normal(jax.random.key(1), vit.patch_embed.bias.shape)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  ours = vit.patchify(images)
  conv = vit.patch_embed(images)  # nnx.Conv: VALID, stride = kernel = patch_size
  assert ours.shape == conv.shape == (2, 32 // vit.patch_size, 32 // vit.patch_size,
                                      vit.patch_embed.kernel.shape[-1])
  np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(conv[:, 0, 0] - conv[:, 1, 0]))) > 1e-2  # rows differ
  assert float(jnp.max(jnp.abs(conv[:, 0, 0] - conv[:, 0, 1]))) > 1e-2  # columns too
