"""The dual encoder: image tower, text tower, projections, temperature, bias,
and (for ITO) a training-time fusion head that the inference path never reads.

`encode_image` / `encode_text` are the serving surface; `image_features` /
`text_features` additionally return token sequences for the fusion head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ito_jax.models.text import TextTransformer
from ito_jax.models.transformer import EncoderSpec, partitioned
from ito_jax.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_LOGIT_SCALE = 100.0
MAX_LOG_SCALE = math.log(MAX_LOGIT_SCALE)  # train.py clamps the parameter here


def l2_normalize(x, axis=-1, eps=1e-6):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def encoder_spec(tower: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> EncoderSpec:
  return EncoderSpec(
      width=tower.width, depth=tower.depth, num_heads=tower.num_heads,
      mlp_ratio=tower.mlp_ratio, dtype=DTYPES[model.dtype],
      param_dtype=DTYPES[model.param_dtype], scan=model.scan_layers,
      remat=model.remat, attention=model.attention)


class ItoModel(nnx.Module):

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """config: the `model` section of an experiment config (configs/common.py)."""
    image_spec = encoder_spec(config.image, config)
    text_spec = encoder_spec(config.text, config)
    self.image_tower = VisionTransformer(
        image_size=config.image.image_size, patch_size=config.image.patch_size,
        spec=image_spec, rngs=rngs, stem=config.image.stem)
    self.text_tower = TextTransformer(
        vocab_size=config.text.vocab_size, context_length=config.text.context_length,
        spec=text_spec, rngs=rngs)
    proj_kw = dict(use_bias=False, param_dtype=image_spec.param_dtype, rngs=rngs,
                   kernel_init=partitioned(nnx.initializers.lecun_normal(), "embed", "joint"))
    self.image_proj = nnx.Linear(config.image.width, config.embed_dim, **proj_kw)
    self.text_proj = nnx.Linear(config.text.width, config.embed_dim, **proj_kw)
    # Logits are exp(log_scale) * cos + bias; log-parametrised so the scale stays positive.
    self.log_scale = nnx.Param(jnp.asarray(math.log(config.temperature_init), jnp.float32))
    self.logit_bias = nnx.Param(jnp.asarray(config.bias_init, jnp.float32))
    # Training-only: None unless enabled; nothing on the inference path reads it.
    self.fusion_head = nnx.data(None)
    if config.fusion.enabled:
      from ito_jax.models.fusion import FusionHead
      self.fusion_head = FusionHead(
          text_width=config.text.width, image_width=config.image.width,
          width=config.fusion.width, depth=config.fusion.depth,
          num_heads=config.fusion.num_heads, mlp_ratio=config.fusion.mlp_ratio,
          embed_dim=config.embed_dim, dtype=DTYPES[config.dtype],
          param_dtype=DTYPES[config.param_dtype], rngs=rngs)

  # ---- serving surface: never touches fusion parameters -------------------
  def encode_image(self, images):
    """images: [batch, H, W, 3] -> L2-normalised embeddings [batch, embed_dim] (float32)."""
    return self.image_features(images)[0]

  def encode_text(self, tokens):
    """tokens: [batch, length] int32 -> L2-normalised embeddings [batch, embed_dim] (float32)."""
    return self.text_features(tokens)[0]

  def image_features(self, images, keep=None):
    """keep: patch-token indices for training-time patch dropout (VisionTransformer)."""
    pooled, tokens = self.image_tower(images, keep)
    return l2_normalize(self.image_proj(pooled.astype(jnp.float32))), tokens

  def text_features(self, tokens):
    pooled, token_feats, mask = self.text_tower(tokens)
    return l2_normalize(self.text_proj(pooled.astype(jnp.float32))), token_feats, mask

  @property
  def logit_scale(self):
    # Capped before exp. train.py clamps the parameter to exactly the cap, and
    # there `where` passes the whole gradient (jnp.minimum splits a tie's
    # gradient in half between its arguments), so log_scale can move off it.
    t = self.log_scale[...]
    return jnp.exp(jnp.where(t > MAX_LOG_SCALE, MAX_LOG_SCALE, t))


def encoder_filter():
  """An nnx filter selecting every parameter of the inference path."""
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("fusion_head")))


# The parameters each tower name in `optim.locked` covers: the tower and its
# projection into the joint space (LiT locks both; the temperature and bias
# stay trained).
TOWER_PARAMS = {"image": ("image_tower", "image_proj"), "text": ("text_tower", "text_proj")}


def trainable_filter(locked=()):
  """An nnx filter selecting the parameters training updates: every nnx.Param
  but those of the towers named in `locked` (optim.locked)."""
  frozen = [nnx.PathContains(name) for tower in locked for name in TOWER_PARAMS[tower]]
  if not frozen:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen)))


def count_params(model: nnx.Module, filt=nnx.Param) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, filt)))
