"""Transformer text tower: token + position embedding, encoder, EOS pooling.

Token id 0 is padding and every sequence ends in EOS (see
`ito_jax.data.tokenizer`), so the pooled feature is the final-layer token at
the last non-padding position, as in CLIP. Attention is bidirectional with a
padding mask: captions are short and no generative use needs causality.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ito_jax.sharding import constrain_batch
from ito_jax.models.transformer import Encoder, EncoderSpec, layer_norm, partitioned

# Named text sizes (width, depth, heads), matched to the ViT sizes they pair with.
TEXT_SIZES = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (512, 12, 8),
    "L": (768, 12, 12),
}

PAD_ID = 0


class TextTransformer(nnx.Module):

  def __init__(self, *, vocab_size: int, context_length: int, spec: EncoderSpec,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(
        vocab_size, spec.width, dtype=spec.dtype, param_dtype=spec.param_dtype,
        embedding_init=partitioned(nnx.initializers.normal(0.02), "vocab", "embed"), rngs=rngs)
    self.pos_embedding = nnx.Param(
        partitioned(nnx.initializers.normal(0.01), None, "embed")(
            rngs.params(), (context_length, spec.width), spec.param_dtype))
    self.encoder = Encoder(spec, rngs=rngs)
    self.norm = layer_norm(spec.width, spec, rngs)

  def __call__(self, tokens):
    """tokens: [batch, length] int32 -> (pooled [batch, width], tokens [batch, length, width], mask [batch, length])."""
    mask = tokens != PAD_ID  # [batch, length]
    # Look up in the whole table (vocab x width, small) so that the lookup's
    # output, and its gradient, stay split over the batch under a mesh.
    table = self.embed.embedding[...]
    if not jax.sharding.get_abstract_mesh().empty:
      table = jax.lax.with_sharding_constraint(table, P())
    x = constrain_batch(jnp.take(table, tokens, axis=0).astype(self.embed.dtype))
    x = x + self.pos_embedding[...].astype(self.embed.dtype)[: tokens.shape[1]]
    x = self.norm(self.encoder(x, mask))
    last = jnp.maximum(mask.sum(axis=1) - 1, 0)  # [batch] index of EOS
    pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return pooled, x, mask
