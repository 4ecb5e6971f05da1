"""ViT image tower: patchify, learned position embedding, encoder, GAP pooling."""

from __future__ import annotations

from flax import nnx

from ito_jax.models.transformer import Encoder, EncoderSpec, layer_norm, partitioned

# Named sizes (width, depth, heads) as in "An Image is Worth 16x16 Words";
# a variant is written "B/16": size name, then patch size.
VIT_SIZES = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def parse_variant(variant: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, num_heads=12, patch_size=16)."""
  try:
    size, patch = variant.split("/")
    width, depth, heads = VIT_SIZES[size]
    return dict(width=width, depth=depth, num_heads=heads, patch_size=int(patch))
  except (ValueError, KeyError):
    raise ValueError(
        f"unknown ViT variant {variant!r}; expected SIZE/PATCH with SIZE in "
        f"{sorted(VIT_SIZES)}, e.g. 'B/16'") from None


class VisionTransformer(nnx.Module):

  def __init__(self, *, image_size: int, patch_size: int, spec: EncoderSpec, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    self.patch_size = patch_size
    self.dtype = spec.dtype
    num_patches = (image_size // patch_size) ** 2
    self.patch_embed = nnx.Conv(
        3, spec.width, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
        padding="VALID", dtype=spec.dtype, param_dtype=spec.param_dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), None, None, None, "embed"),
        bias_init=partitioned(nnx.initializers.zeros_init(), "embed"), rngs=rngs)
    self.pos_embedding = nnx.Param(
        partitioned(nnx.initializers.normal(0.02), None, "embed")(
            rngs.params(), (num_patches, spec.width), spec.param_dtype))
    self.encoder = Encoder(spec, rngs=rngs)
    self.norm = layer_norm(spec.width, spec, rngs)

  def __call__(self, images):
    """images: [batch, H, W, 3] in [-1, 1] -> (pooled [batch, width], tokens [batch, patches, width])."""
    x = self.patch_embed(images.astype(self.dtype))  # [batch, H/p, W/p, width]
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, patches, width]
    x = x + self.pos_embedding[...].astype(x.dtype)
    tokens = self.norm(self.encoder(x))
    return tokens.mean(axis=1), tokens
