"""ITO training-time fusion head: text tokens cross-attend to image patches.

The head exists only to shape the two towers during training (README,
"Objective", L_fuse): its losses live in `ito_jax/losses/fusion.py`, and it is dropped
from the exported model, so nothing here is on the inference path.

Shape of the computation (B batch, T text tokens, P image patches, W width):

    text  [B,T,Dt] --Linear--> [B,T,W] --+
                                         |-- depth x (pre-LN cross-attn, pre-LN MLP)
    image [B,P,Dv] --Linear--> [B,P,W] --+        --> LN --> masked mean over T
                                                  --> fused [B,W]

Parameters carry logical axis names (`nnx.with_partitioning`), the same
vocabulary as the rest of the model: 'embed' (a model width), 'mlp' (MLP
hidden), 'heads', 'kv' (head dim), 'joint' (shared embedding dim). Building the
head outside a mesh needs `nnx.use_eager_sharding(False)`; inside
`jax.set_mesh(mesh)` with `nnx.logical_axis_rules(rules)` the names are mapped
onto mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_init = nnx.initializers
_partition = nnx.with_partitioning


def _layer_norm(width, *, dtype, param_dtype, rngs):
  return nnx.LayerNorm(
      width,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=_partition(_init.ones_init(), ('embed',)),
      bias_init=_partition(_init.zeros_init(), ('embed',)),
      rngs=rngs,
  )


def _dense(din, dout, axes, *, dtype, param_dtype, rngs, use_bias=True):
  """Linear layer whose kernel is named `axes` and bias `axes[1:]`."""
  return nnx.Linear(
      din,
      dout,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_partition(_init.xavier_uniform(), axes),
      bias_init=_partition(_init.zeros_init(), axes[1:]),
      rngs=rngs,
  )


class CrossAttentionBlock(nnx.Module):
  """Pre-LN residual block: text queries attend to image keys/values, then MLP.

  There is deliberately no text self-attention: every text token reads the
  image independently, so padded text positions can never leak into valid
  ones and masking is needed only at pooling time.
  """

  def __init__(self, *, width, num_heads, mlp_ratio, dtype, param_dtype, rngs):
    if width % num_heads:
      raise ValueError(
          f'FusionHead width={width} is not divisible by num_heads={num_heads}.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_query = _layer_norm(width, **kw)
    self.norm_image = _layer_norm(width, **kw)
    self.attention = nnx.MultiHeadAttention(
        num_heads=num_heads,
        in_features=width,
        qkv_features=width,
        out_features=width,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_partition(_init.xavier_uniform(), ('embed', 'heads', 'kv')),
        out_kernel_init=_partition(
            _init.xavier_uniform(), ('heads', 'kv', 'embed')),
        bias_init=_partition(_init.zeros_init(), ('heads', 'kv')),
        out_bias_init=_partition(_init.zeros_init(), ('embed',)),
        decode=False,
        deterministic=True,
        keep_rngs=False,  # no dropout: keep RNG state out of the param tree
        rngs=rngs,
    )
    hidden = int(width * mlp_ratio)
    self.norm_mlp = _layer_norm(width, **kw)
    self.mlp_in = _dense(width, hidden, ('embed', 'mlp'), **kw)
    self.mlp_out = _dense(hidden, width, ('mlp', 'embed'), **kw)

  def __call__(self, text, image):
    # text: [B, T, W]; image: [B, P, W]. Every image patch is valid, so the
    # attention needs no mask.
    image = self.norm_image(image)
    text = text + self.attention(self.norm_query(text), image, image)
    hidden = jax.nn.gelu(self.mlp_in(self.norm_mlp(text)))
    return text + self.mlp_out(hidden)


class FusionHead(nnx.Module):
  """Training-time fusion of text and image tokens into one vector per pair.

  Pooling is a mask-aware mean over valid text tokens rather than the EOS
  position: the interface carries only a mask (no token ids), so "EOS" would
  have to be guessed as the last valid position, which breaks for tokenizers
  without an EOS or with left padding; and because the blocks have no text
  self-attention, a single EOS query would see only its own token, whereas
  the mean lets every text token's grounding in the image shape the loss.
  """

  def __init__(
      self,
      *,
      text_width: int,
      image_width: int,
      width: int,
      depth: int,
      num_heads: int,
      mlp_ratio: float,
      embed_dim: int,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if not 1 <= depth <= 2:
      raise ValueError(
          f'FusionHead depth={depth}: the fusion stack is meant to be light '
          '(L_fuse in the README), use 1 or 2.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The head's width is its 'embed' axis. The tower width coming in is
    # 'embed' in the towers too, but a kernel cannot name one mesh axis twice,
    # so the input side is left unnamed (replicated).
    self.text_in = _dense(text_width, width, (None, 'embed'), **kw)
    self.image_in = _dense(image_width, width, (None, 'embed'), **kw)
    self.blocks = nnx.List([
        CrossAttentionBlock(width=width, num_heads=num_heads,
                            mlp_ratio=mlp_ratio, **kw)
        for _ in range(depth)
    ])
    self.norm_out = _layer_norm(width, **kw)
    self.match_head = _dense(width, 1, ('embed', None), **kw)
    # No bias, as in CLIP's projections: the anchor is a direction.
    self.anchor_proj = _dense(width, embed_dim, ('embed', 'joint'),
                              use_bias=False, **kw)

  def __call__(self, text_tokens, text_mask, image_tokens):
    """text_tokens [B,T,Dt], text_mask [B,T] bool, image_tokens [B,P,Dv] -> [B,W]."""
    text = self.text_in(text_tokens)  # [B, T, W]
    image = self.image_in(image_tokens)  # [B, P, W]
    for block in self.blocks:
      text = block(text, image)
    text = self.norm_out(text).astype(jnp.float32)  # [B, T, W]
    # Padded positions are zeroed with `where`, not multiplied by the mask, so
    # a NaN/inf in a padded input cannot reach the pooled vector.
    weight = text_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    total = jnp.where(text_mask[..., None], text, 0.0).sum(axis=1)  # [B, W]
    return total / jnp.maximum(weight.sum(axis=1), 1.0)  # [B, W]

  def match_logit(self, fused):
    """ITM logit, [B, W] -> [B]; > 0 means "this text matches this image"."""
    return self.match_head(fused)[..., 0].astype(jnp.float32)

  def anchor(self, fused):
    """Fused anchor in the shared embedding space, [B, W] -> [B, E], unit norm."""
    z = self.anchor_proj(fused).astype(jnp.float32)
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))
