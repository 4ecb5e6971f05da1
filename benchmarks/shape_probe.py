"""How fast the image tower can learn an ito_shapes attribute at all.

Trains a config's image tower (patch embedding or conv stem, `model.image.stem`)
with a linear head on the true shape, colour or class labels of the training
split: plain supervised learning, no captions, the deterministic full-frame
evaluation view as input. Prints held-out accuracy. This bounds what any
image–text objective can teach the same tower in the same number of steps:
with 4-pixel patches the tiny tower of `configs/ot_partial_tiny_cpu.py`
learns shape slowly even from the labels themselves (docs/ot_experiments.md).
`--num_train=400` limits the labels to as many images as a ρ = 5%% run has
aligned pairs.

  python benchmarks/shape_probe.py --config=configs/ot_partial_tiny_cpu.py \\
      --attribute=shape --steps=300 [--config.model.image.stem=conv] \\
      [--num_train=400] [--config.data.data_dir=DIR]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import common  # noqa: E402
from ito_jax import train  # noqa: E402
from ito_jax.data import augment, pipeline, synthetic  # noqa: E402
from ito_jax.models.ito import encoder_spec  # noqa: E402
from ito_jax.models.vit import VisionTransformer  # noqa: E402

NUM_SHAPES = len(synthetic.SHAPES)


def attribute_labels(labels: np.ndarray, attribute: str) -> tuple[np.ndarray, int]:
  """ito_shapes class labels (colour * 5 + shape) -> (attribute labels, number of values)."""
  if attribute == "shape":
    return labels % NUM_SHAPES, NUM_SHAPES
  if attribute == "colour":
    return labels // NUM_SHAPES, len(synthetic.COLOURS)
  return labels, len(synthetic.CLASS_NAMES)


def load(builder, split: str, size: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
  source = builder.as_data_source(split)
  n = min(limit, len(source)) if limit else len(source)
  images, labels = [], []
  for i in range(n):
    record = source[i]
    images.append(augment.to_unit_range(augment.resize(np.asarray(record["image"]), size)))
    labels.append(record["label"])
  return np.stack(images).astype(np.float32), np.asarray(labels)


class Probe(nnx.Module):

  def __init__(self, model_config, num_classes: int, rngs: nnx.Rngs):
    image = model_config.image
    self.tower = VisionTransformer(image_size=image.image_size, patch_size=image.patch_size,
                                   spec=encoder_spec(image, model_config), rngs=rngs,
                                   stem=image.stem)
    self.head = nnx.Linear(image.width, num_classes, rngs=rngs)

  def __call__(self, images):
    return self.head(self.tower(images)[0])


def run(config, attribute: str, steps: int, num_eval: int, data_dir: str, num_train: int = 0) -> dict:
  """`num_train` > 0 trains on the first that many training images only: how
  much the tower learns from as many labelled images as a partially aligned
  run has pairs (400 at ρ = 5%)."""
  common.validate(config)
  builder = pipeline.builder_for(config, data_dir)
  size = config.model.image.image_size
  available = len(builder.as_data_source("train"))
  if not 0 <= num_train <= available:
    raise ValueError(f"num_train={num_train}: the train split has {available} images "
                     "(0 uses all of them)")
  x_train, y_train = load(builder, "train", size, num_train)
  x_test, y_test = load(builder, "test", size, num_eval)
  (y_train, k), (y_test, _) = attribute_labels(y_train, attribute), attribute_labels(y_test, attribute)
  with nnx.use_eager_sharding(False):
    model = Probe(config.model, k, nnx.Rngs(config.seed))
  config = config.copy_and_resolve_references()
  config.total_steps = steps  # the schedule's cosine spans the probe's steps
  optimizer = nnx.Optimizer(model, train.make_optimizer(config), wrt=nnx.Param)  # the run's AdamW

  @nnx.jit
  def step(model, optimizer, images, labels):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(config.seed)
  start = time.perf_counter()
  loss = float("nan")
  for _ in range(steps):
    idx = rng.integers(0, len(y_train), config.batch_size)
    loss = float(step(model, optimizer, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])))
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_test))
  accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=1) == y_test))
  return {"attribute": attribute, "stem": config.model.image.stem, "steps": steps,
          "num_train": len(y_train),
          "train_loss": loss, "test_accuracy": accuracy, "chance": 1.0 / k,
          "seconds": time.perf_counter() - start}


def main(argv):
  del argv
  config = flags.FLAGS.config
  data_dir = config.data.data_dir or os.path.join(flags.FLAGS.workdir, "data")
  r = run(config, flags.FLAGS.attribute, flags.FLAGS.steps, flags.FLAGS.num_eval, data_dir,
          flags.FLAGS.num_train)
  print(f"{r['attribute']}: stem {r['stem']}, {r['steps']} steps on {r['num_train']} training "
        f"images: held-out accuracy "
        f"{r['test_accuracy']:.3f} (chance {r['chance']:.3f}), last train loss "
        f"{r['train_loss']:.3f}, {r['seconds']:.0f} s")


def define_flags():
  """Only when run as a script: importing this file (its tests) must not
  define absl flags that other modules of the same process define too."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_enum("attribute", "shape", ["shape", "colour", "class"], "Label to learn.")
  flags.DEFINE_integer("steps", 300, "Training steps (batch config.batch_size).")
  flags.DEFINE_integer("num_eval", 1000, "Held-out images scored.")
  flags.DEFINE_integer("num_train", 0, "Train on the first N training images only (0: all).")
  flags.DEFINE_string("workdir", "/tmp/ito_shape_probe",
                      "Where the data set is built when config.data.data_dir is empty.")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  define_flags()
  app.run(main)
