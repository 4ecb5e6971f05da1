"""The `bench_s` shape: the fixed small model and batch on which ito_jax is
compared with other codebases (see benchmarks/)."""

from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/bench_s.py")
  c = common.base_config()
  c.model.image.update(variant="S-6/16", image_size=128, patch_size=16, width=384, depth=6, num_heads=6)
  c.model.text.update(variant="bench", vocab_size=8192, context_length=32, width=256, depth=4, num_heads=4)
  c.model.embed_dim = 256
  c.model.temperature_init = 1 / 0.07
  c.loss.name = "softmax"
  c.batch_size = 128
  c.optim.update(learning_rate=5e-4, warmup_steps=100)
  return c
