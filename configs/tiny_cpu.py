"""The embedded default: a tiny CLIP that learns the synthetic shapes data set
in a few CPU minutes (`make demo`)."""

from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/tiny_cpu.py", accepted=("runlocal",))
  c = common.base_config()
  c.total_steps = 1500
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.batch_size = 128
  c.model.embed_dim = 128
  c.model.image.update(variant="tiny/8", image_size=32, patch_size=8, width=128, depth=4, num_heads=4)
  c.model.text.update(variant="tiny", vocab_size=512, context_length=24, width=128, depth=2, num_heads=4)
  c.model.fusion.update(width=128, depth=1, num_heads=4)
  c.model.temperature_init = 1 / 0.07
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.05
  c.data.num_train = 8000
  c.data.num_eval = 500
  c.eval.batch_size = 500
  if arg == "runlocal":  # a seconds-long smoke run
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.data.num_train = 512
    c.data.num_eval = 128
  return c
