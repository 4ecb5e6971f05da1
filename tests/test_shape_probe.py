"""benchmarks/shape_probe.py: supervised attribute learning of the image tower."""

import os

import numpy as np
import pytest

from configs import tiny_cpu
from ito_jax.data import synthetic

import benchmark_scripts

shape_probe = benchmark_scripts.load("shape_probe")


def test_attribute_labels_follow_the_class_layout():
  labels = np.array([synthetic.CLASS_NAMES.index("green triangle"),
                     synthetic.CLASS_NAMES.index("orange cross")])
  shapes, k = shape_probe.attribute_labels(labels, "shape")
  assert k == 5 and [synthetic.SHAPES[s] for s in shapes] == ["triangle", "cross"]
  colours, k = shape_probe.attribute_labels(labels, "colour")
  assert k == 6 and [synthetic.COLOURS[c] for c in colours] == ["green", "orange"]
  assert shape_probe.attribute_labels(labels, "class")[1] == 30


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_a_short_probe_learns_colour(tmp_path, stem):
  """Colour is the easy attribute (near 0.9 after 300 full-size steps); a
  micro tower gets well above chance (1/6) in 60 steps with either stem."""
  c = tiny_cpu.get_config("runlocal")  # 512 training images, 128 held out
  c.model.image.update(patch_size=4, width=64, depth=1, num_heads=2, stem=stem)
  c.batch_size = 32
  c.optim.warmup_steps = 10
  r = shape_probe.run(c, "colour", steps=60, num_eval=128, data_dir=str(tmp_path / "data"))
  assert r["chance"] == pytest.approx(1 / 6)
  assert r["test_accuracy"] > 2.5 * r["chance"], r


def test_num_train_limits_the_labelled_images(tmp_path):
  c = tiny_cpu.get_config("runlocal")  # 512 training images
  c.model.image.update(patch_size=4, width=32, depth=1, num_heads=2)
  c.batch_size = 8
  data_dir = str(tmp_path / "data")
  assert shape_probe.run(c, "shape", steps=1, num_eval=8, data_dir=data_dir)["num_train"] == 512
  assert shape_probe.run(c, "shape", steps=1, num_eval=8, data_dir=data_dir, num_train=48)["num_train"] == 48
  with pytest.raises(ValueError, match="num_train=513: the train split has 512 images"):
    shape_probe.run(c, "shape", steps=1, num_eval=8, data_dir=data_dir, num_train=513)


def test_command_line(tmp_path):
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, shape_probe.__file__, "--config=configs/tiny_cpu.py:runlocal", "--attribute=shape",
       "--steps=2", "--num_eval=16", "--num_train=32", f"--config.data.data_dir={tmp_path / 'data'}",
       "--config.model.image.stem=conv", "--config.model.image.patch_size=4"],
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(benchmark_scripts.BENCHMARKS))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "shape: stem conv, 2 steps on 32 training images: held-out accuracy" in out.stdout
