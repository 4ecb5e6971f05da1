"""ViT image tower: patchify (or a convolutional stem), learned position
embedding, encoder, GAP pooling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
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


STEMS = ("patch", "conv")


def kept_patches(image) -> int:
  """Patch tokens an image keeps in training under model.image.patch_dropout
  (all of them at 0): floor((1 - rate) x patches), as in FLIP."""
  patches = (image.image_size // image.patch_size) ** 2
  # The tolerance absorbs float rounding: (1 - 0.9) x 100 is 9.999..., not 10.
  return math.floor(patches * (1.0 - image.patch_dropout) + 1e-9)


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
  """Output channels of the conv stem's 3x3 stride-2 layers: log2(patch_size)
  of them, doubling up to width / 2 (the 1x1 layer after them maps to width)."""
  n = patch_size.bit_length() - 1
  if patch_size < 2 or patch_size != 1 << n:
    raise ValueError(f"model.image.stem='conv' needs a power-of-two patch_size >= 2, got {patch_size}")
  if width % (1 << n):
    raise ValueError(f"model.image.stem='conv': width {width} is not divisible by "
                     f"{1 << n} (the first of {n} stride-2 layers has width / {1 << n} channels)")
  return [width >> (n - i) for i in range(n)]


class ConvStem(nnx.Module):
  """Early convolutions (Xiao et al. 2021, "Early Convolutions Help
  Transformers See Better"): 3x3 stride-2 convolutions with GELU, channels
  doubling, then a 1x1 convolution to the width. It yields the same token
  grid as patch_size patches, but each token sees its neighbourhood through
  overlapping kernels, which lets a small tower learn local shape far sooner
  (docs/ot_experiments.md)."""

  def __init__(self, patch_size: int, spec: EncoderSpec, rngs: nnx.Rngs):
    channels = [3] + conv_stem_channels(patch_size, spec.width)
    kw = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)
    self.layers = nnx.List([
        nnx.Conv(c_in, c_out, kernel_size=(3, 3), strides=(2, 2), padding="SAME",
                 kernel_init=partitioned(nnx.initializers.lecun_normal(), None, None, None, None),
                 bias_init=partitioned(nnx.initializers.zeros_init(), None), **kw)
        for c_in, c_out in zip(channels[:-1], channels[1:])])
    self.out = nnx.Conv(
        channels[-1], spec.width, kernel_size=(1, 1),
        kernel_init=partitioned(nnx.initializers.lecun_normal(), None, None, None, "embed"),
        bias_init=partitioned(nnx.initializers.zeros_init(), "embed"), **kw)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.out(x)


def check_keep(keep, batch: int, patches: int) -> None:
  """Raises ValueError unless `keep` is [batch, K] integer indices, 1 <= K <=
  patches, each in [0, patches). Shapes are checked always, values when they
  are concrete (not traced): under jit an out-of-range index would gather
  NaN, so traced indices must come from with_patch_dropout, which draws them
  in range."""
  shape, dtype = jnp.shape(keep), jnp.result_type(keep)
  if len(shape) != 2 or shape[0] != batch or not 1 <= shape[1] <= patches:
    raise ValueError(f"keep: expected [batch={batch}, K] patch indices with 1 <= K <= {patches}, "
                     f"got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"keep: expected integer patch indices, got dtype {dtype}")
  if not isinstance(keep, jax.core.Tracer):
    values = np.asarray(keep)
    if values.min() < 0 or values.max() >= patches:
      raise ValueError(f"keep: patch indices must lie in [0, {patches}), got values from "
                       f"{values.min()} to {values.max()}")


class VisionTransformer(nnx.Module):

  def __init__(self, *, image_size: int, patch_size: int, spec: EncoderSpec, rngs: nnx.Rngs,
               stem: str = "patch"):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    self.patch_size = patch_size
    self.dtype = spec.dtype
    num_patches = (image_size // patch_size) ** 2
    if stem == "patch":
      self.patch_embed = nnx.Conv(
          3, spec.width, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
          padding="VALID", dtype=spec.dtype, param_dtype=spec.param_dtype,
          kernel_init=partitioned(nnx.initializers.lecun_normal(), None, None, None, "embed"),
          bias_init=partitioned(nnx.initializers.zeros_init(), "embed"), rngs=rngs)
    elif stem == "conv":
      self.patch_embed = ConvStem(patch_size, spec, rngs)
    else:
      raise ValueError(f"unknown model.image.stem {stem!r}; expected one of {STEMS}")
    self.pos_embedding = nnx.Param(
        partitioned(nnx.initializers.normal(0.02), None, "embed")(
            rngs.params(), (num_patches, spec.width), spec.param_dtype))
    self.encoder = Encoder(spec, rngs=rngs)
    self.norm = layer_norm(spec.width, spec, rngs)

  def __call__(self, images, keep=None):
    """images: [batch, H, W, 3] in [-1, 1] -> (pooled [batch, width], tokens [batch, patches, width]).

    keep: None, or [batch, K] indices of the patch tokens to encode (patch
    dropout, training only): each token keeps its own position embedding,
    the others never enter the encoder, and pooling and the returned tokens
    cover the K kept ones."""
    x = images.astype(self.dtype)
    if isinstance(self.patch_embed, ConvStem):
      x = self.patch_embed(x)  # [batch, H/p, W/p, width]
    else:
      x = self.patchify(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, patches, width]
    x = x + self.pos_embedding[...].astype(x.dtype)
    if keep is not None:
      check_keep(keep, x.shape[0], x.shape[1])
      x = jnp.take_along_axis(x, keep[..., None], axis=1)  # [batch, K, width]
    tokens = self.norm(self.encoder(x))
    return tokens.mean(axis=1), tokens

  def patchify(self, x):
    """`patch_embed`'s convolution (patch_size x patch_size, stride
    patch_size, VALID) computed as one matmul over the non-overlapping
    patches: the same parameters and values as calling the nnx.Conv. Its
    kernel gradient is then a plain matmul; as a strided convolution, XLA's
    CPU backend compiled it to a kernel that took half the backward pass when
    the tower runs inside a loop (optim.accumulation_steps)."""
    conv, p = self.patch_embed, self.patch_size
    b, height, width, channels = x.shape
    x = x.reshape(b, height // p, p, width // p, p, channels)
    x = jnp.einsum("bhiwjc,ijco->bhwo", x, conv.kernel[...].astype(x.dtype))
    return x + conv.bias[...].astype(x.dtype)  # [batch, H/p, W/p, width]
