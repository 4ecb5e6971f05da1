"""ITO at real scale: ViT-B/16 + base text tower, M = 2 image views and N = 2
caption views per sample, a 2-block fusion head (width 512) trained with ITM
on mined hard negatives and the fused-anchor loss; the head is discarded at
export, so serving costs the same as clip_vit_b16."""

from configs import common, clip_vit_b16


def get_config(arg=None):
  common.check_arg(arg, "configs/ito_vit_b16.py")
  c = clip_vit_b16.get_config(arg)
  c.model.fusion.update(enabled=True, width=512, depth=2, num_heads=8, mlp_ratio=4.0)
  c.loss.num_image_views = 2
  c.loss.num_text_views = 2
  c.loss.itm_weight = 1.0
  c.loss.anchor_weight = 1.0
  return c
