"""Pre-LayerNorm Transformer encoder shared by the image and the text tower.

Parameters carry *logical* axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``layers``); `ito_jax.sharding` maps them onto mesh axes, so sharding a model
needs no change here. With ``scan=True`` the blocks are stacked on a leading
``layers`` axis and run under ``nnx.scan`` so compile time stays flat in depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ito_jax.sharding import constrain_batch

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("xla", "cudnn", "einsum")


def partitioned(init, *axes):
  return nnx.with_partitioning(init, axes)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = False
  remat: str = "none"
  attention: str = "xla"

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)


def layer_norm(width: int, spec: EncoderSpec, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      width, epsilon=1e-6, dtype=spec.dtype, param_dtype=spec.param_dtype,
      scale_init=partitioned(nnx.initializers.ones_init(), "embed"),
      bias_init=partitioned(nnx.initializers.zeros_init(), "embed"),
      rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self- or cross-attention over [batch, length, width] inputs."""

  def __init__(self, spec: EncoderSpec, *, rngs: nnx.Rngs, kv_width: int | None = None):
    if spec.width % spec.num_heads:
      raise ValueError(f"width {spec.width} is not divisible by num_heads {spec.num_heads}")
    self.spec = spec
    head_dim = spec.width // spec.num_heads
    kv_width = kv_width or spec.width
    init = nnx.initializers.xavier_uniform()
    kw = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    self.query = nnx.LinearGeneral(
        spec.width, (spec.num_heads, head_dim),
        kernel_init=partitioned(init, "embed", "heads", "kv"),
        bias_init=partitioned(nnx.initializers.zeros_init(), "heads", "kv"), **kw)
    self.key = nnx.LinearGeneral(
        kv_width, (spec.num_heads, head_dim),
        kernel_init=partitioned(init, "embed", "heads", "kv"),
        bias_init=partitioned(nnx.initializers.zeros_init(), "heads", "kv"), **kw)
    self.value = nnx.LinearGeneral(
        kv_width, (spec.num_heads, head_dim),
        kernel_init=partitioned(init, "embed", "heads", "kv"),
        bias_init=partitioned(nnx.initializers.zeros_init(), "heads", "kv"), **kw)
    self.out = nnx.LinearGeneral(
        (spec.num_heads, head_dim), spec.width, axis=(-2, -1),
        kernel_init=partitioned(init, "heads", "kv", "embed"),
        bias_init=partitioned(nnx.initializers.zeros_init(), "embed"), **kw)

  def __call__(self, x, kv=None, kv_mask=None):
    """x: [batch, q_len, width]; kv: [batch, kv_len, kv_width] (defaults to x);
    kv_mask: [batch, kv_len] bool, True where a key may be attended to."""
    kv = x if kv is None else kv
    q = self.query(x)  # [batch, q_len, heads, head_dim]
    k = self.key(kv)  # [batch, kv_len, heads, head_dim]
    v = self.value(kv)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]  # [batch, 1, 1, kv_len]
    if self.spec.attention == "einsum":
      # Logits in float32 whatever the compute dtype, as jax.nn.dot_product_attention
      # keeps them: bf16 logits round by up to 1/256 of their size before the
      # softmax (0.125 at 30), which exponentiates into the weights.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      if mask is not None and self.spec.attention == "cudnn":
        # cuDNN takes the mask as a bias of the full [.., q_len, kv_len] shape.
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.spec.attention)
    return self.out(y)


class Mlp(nnx.Module):

  def __init__(self, spec: EncoderSpec, *, rngs: nnx.Rngs):
    kw = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    init = nnx.initializers.xavier_uniform()
    self.fc1 = nnx.Linear(spec.width, spec.mlp_dim,
                          kernel_init=partitioned(init, "embed", "mlp"),
                          bias_init=partitioned(nnx.initializers.zeros_init(), "mlp"), **kw)
    self.fc2 = nnx.Linear(spec.mlp_dim, spec.width,
                          kernel_init=partitioned(init, "mlp", "embed"),
                          bias_init=partitioned(nnx.initializers.zeros_init(), "embed"), **kw)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):

  def __init__(self, spec: EncoderSpec, *, rngs: nnx.Rngs):
    self.norm1 = layer_norm(spec.width, spec, rngs)
    self.attn = Attention(spec, rngs=rngs)
    self.norm2 = layer_norm(spec.width, spec, rngs)
    self.mlp = Mlp(spec, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), kv_mask=mask)
    return x + self.mlp(self.norm2(x))


def _run_block(block: Block, x, mask, remat: str):
  policy = REMAT_POLICIES[remat]
  if remat == "none":
    return block(x, mask)
  return nnx.remat(lambda b, x, m: b(x, m), policy=policy)(block, x, mask)


class Encoder(nnx.Module):
  """`depth` pre-LN blocks, looped in Python or scanned over a stacked axis."""

  def __init__(self, spec: EncoderSpec, *, rngs: nnx.Rngs):
    if spec.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {spec.remat!r}")
    if spec.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {spec.attention!r}")
    self.spec = spec
    if spec.scan:
      @nnx.split_rngs(splits=spec.depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs):
        return Block(spec, rngs=rngs)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(spec, rngs=rngs) for _ in range(spec.depth)])

  def __call__(self, x, mask=None):
    """x: [batch, length, width]; mask: [batch, length] bool or None. Under a
    mesh the activations stay split over the batch between blocks
    (sharding.constrain_batch)."""
    remat = self.spec.remat
    x = constrain_batch(x)
    if self.spec.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
      def body(x, block, mask):
        return constrain_batch(_run_block(block, x, mask, remat))
      return body(x, self.blocks, mask)
    for block in self.blocks:
      x = constrain_batch(_run_block(block, x, mask, remat))
    return x
