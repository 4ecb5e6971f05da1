"""Model FLOPs and MFU: an analytic count of the dual encoder's matmul FLOPs,
and a table of accelerator peaks.

Convention (as in PaLM's MFU): *model* FLOPs count every matrix multiply of the
forward pass as 2·m·n·k, and a train step as 3× the forward (the backward pass
costs two forward matmuls: one for activations' and one for weights'
gradients). Elementwise work (norms, softmax, GELU, AdamW) and remat's
recomputation are not counted, so MFU does not reward recomputation. XLA's
cost analysis, by contrast, counts what the compiled step executes; the bench
prints both and their ratio as a cross-check.
"""

from __future__ import annotations

import ml_collections

from ito_jax import objective_ot
from ito_jax.models import vit

# Dense bf16 peak TFLOP/s per chip (per device as jax lists it), from vendor
# data sheets. Matched by lower-cased substring of jax's `device_kind`, first
# match wins, so more specific names come first.
PEAK_BF16_TFLOPS = (
    ("tpu v6 lite", 918.0),  # v6e (Trillium)
    ("tpu v6e", 918.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # v5p reports "TPU v5"
    ("tpu v4", 275.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM / HBM3
    ("a100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s for a jax device_kind, or None if not in the table
  (CPUs and unknown accelerators: pass --peak_tflops)."""
  kind = device_kind.lower()
  for name, peak in PEAK_BF16_TFLOPS:
    if name in kind:
      return peak
  return None


def encoder_forward_flops(length: int, width: int, depth: int, mlp_dim: int) -> int:
  """Matmul FLOPs of one sequence through `depth` pre-LN blocks: Q, K, V and
  output projections (4·2·L·W²), scores and weighted values (2·2·L²·W), MLP
  (2·2·L·W·F)."""
  per_block = 8 * length * width * width + 4 * length * length * width + 4 * length * width * mlp_dim
  return depth * per_block


def stem_forward_flops(image: ml_collections.ConfigDict) -> int:
  """Matmul FLOPs of one image through the stem: the patch_size x patch_size
  patch embedding, or the conv stem's 3x3 stride-2 layers and its 1x1 layer."""
  grid = image.image_size // image.patch_size
  if image.stem != "conv":
    return 2 * grid * grid * image.patch_size ** 2 * 3 * image.width
  channels = [3] + vit.conv_stem_channels(image.patch_size, image.width)
  flops, size = 0, image.image_size
  for c_in, c_out in zip(channels[:-1], channels[1:]):
    size = -(-size // 2)  # SAME padding, stride 2
    flops += 2 * size * size * 9 * c_in * c_out
  return flops + 2 * grid * grid * channels[-1] * image.width


def forward_flops_per_example(config: ml_collections.ConfigDict) -> dict:
  """Forward matmul FLOPs per example (M image views, N text views), by part."""
  m, loss = config.model, config.loss
  img, txt = m.image, m.text
  patches = (img.image_size // img.patch_size) ** 2
  views_i, views_t = loss.num_image_views, loss.num_text_views
  parts = {
      "patch_embed": views_i * stem_forward_flops(img),
      # Under patch dropout the encoder sees only the kept tokens.
      "image_encoder": views_i * encoder_forward_flops(
          vit.kept_patches(img), img.width, img.depth, int(img.width * img.mlp_ratio)),
      "text_encoder": views_t * encoder_forward_flops(
          txt.context_length, txt.width, txt.depth, int(txt.width * txt.mlp_ratio)),
      "projections": 2 * m.embed_dim * (views_i * img.width + views_t * txt.width),
      # One row of the [B·M, B·N] similarity matrix per image view.
      "logits": views_i * 2 * config.batch_size * views_t * m.embed_dim,
  }
  if m.fusion.enabled:
    parts["fusion_head"] = 0  # not counted: training-only, small (see bench --fusion_overhead)
  if "partial" in config and objective_ot.uses_unaligned(config):
    # The unaligned image and text batches R_ot embeds every step once it is on
    # (before ot.start_step a lax.cond skips them: those steps cost less, and
    # ito_jax.bench times a step after it), shared over the aligned batch's
    # examples. Not counted without R_ot (ot weights 0: the objective never
    # encodes them), nor the Sinkhorn iterations themselves.
    p = config.partial
    share = p.unaligned_batch_size * p.unaligned_views / config.batch_size
    tokens = vit.kept_patches(img) if p.unaligned_patch_dropout else patches
    one_view = (stem_forward_flops(img)
                + encoder_forward_flops(tokens, img.width, img.depth, int(img.width * img.mlp_ratio))
                + encoder_forward_flops(txt.context_length, txt.width, txt.depth,
                                        int(txt.width * txt.mlp_ratio))
                + 2 * m.embed_dim * (img.width + txt.width))
    parts["unaligned_towers"] = share * one_view
  return parts


def locked_forward_flops(config: ml_collections.ConfigDict) -> float:
  """Forward FLOPs per example of the towers `optim.locked` names, projections
  and the unaligned batches R_ot embeds included: the part of the forward
  pass with no backward pass (nothing below a locked tower trains)."""
  locked = config.optim.get("locked", ())
  if not locked:
    return 0.0
  m, loss = config.model, config.loss
  img, txt = m.image, m.text
  parts = forward_flops_per_example(config)
  unaligned = "unaligned_towers" in parts
  share = (config.partial.unaligned_batch_size * config.partial.unaligned_views / config.batch_size
           if unaligned else 0.0)
  total = 0.0
  if "image" in locked:
    tokens = (vit.kept_patches(img) if unaligned and config.partial.unaligned_patch_dropout
              else (img.image_size // img.patch_size) ** 2)
    unaligned_view = (stem_forward_flops(img) + encoder_forward_flops(
        tokens, img.width, img.depth, int(img.width * img.mlp_ratio)) + 2 * m.embed_dim * img.width)
    total += (parts["patch_embed"] + parts["image_encoder"]
              + 2 * m.embed_dim * loss.num_image_views * img.width + share * unaligned_view)
  if "text" in locked:
    unaligned_view = (encoder_forward_flops(txt.context_length, txt.width, txt.depth,
                                            int(txt.width * txt.mlp_ratio))
                      + 2 * m.embed_dim * txt.width)
    total += (parts["text_encoder"] + 2 * m.embed_dim * loss.num_text_views * txt.width
              + share * unaligned_view)
  if "image" in locked and "text" in locked:
    # Both sides of the similarity matrix are constants: its matmul has no
    # backward pass either (the temperature's gradient reads the logits).
    total += parts["logits"]
  return total


def train_flops_per_example(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of one train step per example: 3 × forward, but 1 × for the
  towers optim.locked names (they run forward only)."""
  locked = locked_forward_flops(config)
  return 3.0 * (sum(forward_flops_per_example(config).values()) - locked) + locked


SCAN_NOTE = ("XLA's cost analysis counts a while-loop body once, so with model.scan_layers "
             "its FLOPs miss (depth - 1) layers per tower; the analytic count is the one to use")
ACCUMULATION_NOTE = ("XLA's cost analysis counts a while-loop body once, so with "
                     "optim.accumulation_steps = A it counts the towers of one microbatch (and "
                     "their second forward pass); the analytic count is the one to use")
GPU_NOTE = ("on GPU XLA's cost analysis has counted a small part of the step: 0.067 of the "
            "analytic FLOPs for an unscanned ViT-B/16 step on an H200 (jax 0.11.2); the "
            "analytic count is the one to use")


def xla_flops_note(config: ml_collections.ConfigDict, platform: str = "cpu") -> str | None:
  """Why XLA's FLOP count of a compiled step misses work, or None when it does
  not. platform: jax's name for the backend (`jax.devices()[0].platform`)."""
  notes = [note for on, note in ((config.model.scan_layers, SCAN_NOTE),
                                 (config.optim.accumulation_steps > 1, ACCUMULATION_NOTE),
                                 (platform == "gpu", GPU_NOTE)) if on]
  return "; ".join(notes) or None


def mfu_figures(config: ml_collections.ConfigDict, step_s: float, device_kind: str,
                num_devices: int, xla_flops_per_step: float | None = None,
                peak: float | None = None, platform: str = "cpu") -> dict:
  """Achieved model FLOP/s and MFU for a step of `step_s` seconds.

  peak: per-device peak TFLOP/s; None looks `device_kind` up in the table.
  MFU is reported only when a peak is known (never guessed for CPUs).
  xla_flops_per_step: XLA cost analysis of the compiled step (per device on a
  sharded step), for the cross-check against the analytic count.
  platform: jax's backend name, for the note on what XLA's count misses.
  """
  if step_s <= 0:
    raise ValueError(f"step_s must be positive, got {step_s}")
  per_example = train_flops_per_example(config)
  per_step = per_example * config.batch_size
  achieved = per_step / step_s / 1e12
  figures = {"model_flops_per_example": per_example, "model_tflops_per_s": achieved}
  if xla_flops_per_step:
    xla_total = xla_flops_per_step * num_devices
    figures["xla_flops_per_example"] = xla_total / config.batch_size
    figures["xla_over_model_flops"] = xla_total / per_step
    figures["xla_tflops_per_s"] = xla_total / step_s / 1e12
    if note := xla_flops_note(config, platform):
      figures["xla_flops_note"] = note
  peak = peak if peak else peak_tflops(device_kind)
  if peak:
    figures["peak_tflops_per_device"] = peak
    figures["mfu_pct"] = 100 * achieved / (peak * num_devices)
  else:
    figures["mfu_pct"] = "n/a (no peak for this device; pass --peak_tflops)"
  return figures
