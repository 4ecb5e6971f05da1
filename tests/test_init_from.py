"""config.init_from and optim.locked: a run that starts from an export
(fine-tuning), with a locked tower (LiT)."""

import os

import numpy as np
import pytest

import tiny_run
from configs import common
from ito_jax import checkpoint, export, init_from, train


def _config(reference, **overrides):
  return tiny_run.config(reference["data_dir"],
                         init_from=os.path.join(reference["workdir"], "export"), **overrides)


def test_a_run_from_an_export_starts_from_its_encoders_and_a_locked_tower_stays(
    tiny_reference_run, tmp_path):
  """Three steps from the reference run's export with the image tower locked:
  the image tower and projection end bit-identical to the export's, the text
  tower moves but stays near the export's (a random start is as far from it
  as its own size), the run uses the export's tokenizer, and the optimizer
  holds no state for the locked tower."""
  source = os.path.join(tiny_reference_run["workdir"], "export")
  # Another seed than the reference run's: a random start of this run is not
  # the export's own starting point.
  config = _config(tiny_reference_run, seed=1, total_steps=3, checkpoint_every_steps=3,
                   **{"optim.locked": ("image",), "optim.learning_rate": 1e-3})
  workdir = str(tmp_path / "lit")
  train.train_and_evaluate(config, workdir)
  before, after = export.read(source), export.read(os.path.join(workdir, "export"))
  assert after.tokenizer_bytes == before.tokenizer_bytes
  with open(os.path.join(workdir, "tokenizer.model"), "rb") as f:
    assert f.read() == before.tokenizer_bytes
  moved = {}
  for name, value in before.params.items():
    diff = np.abs(np.asarray(after.params[name], np.float32) - np.asarray(value, np.float32)).max()
    if name.startswith(("image_tower/", "image_proj/")):
      assert diff == 0.0, name
    else:
      moved[name] = diff
  text = [n for n in moved if n.startswith(("text_tower/", "text_proj/"))]
  assert max(moved[n] for n in text) > 0  # the text tower trained
  kernel = "text_proj/kernel"
  start, end = np.asarray(before.params[kernel]), np.asarray(after.params[kernel])
  assert np.linalg.norm(end - start) < 0.1 * np.linalg.norm(start)
  # No Adam moments for the locked tower in the checkpoint.
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    names = set(checkpoint.flatten(ckpt.manager.item_metadata(3)["state"]))
  finally:
    ckpt.close()
  optimizer_names = [n for n in names if "opt_state" in n]
  assert any("text_tower" in n for n in optimizer_names)
  assert not any("image_tower" in n or "image_proj" in n for n in optimizer_names)


def test_an_export_of_other_tower_shapes_is_refused_naming_the_fields(tiny_reference_run):
  config = _config(tiny_reference_run, **{"model.image.width": 64, "model.image.num_heads": 4})
  with pytest.raises(common.ConfigError, match=(
      r"config.init_from: the export .* holds towers of other shapes than this config builds "
      r"\(model.image.width is 32 in the export, 64 here; model.image.num_heads is 2 in the "
      r"export, 4 here; \d+ parameters differ, e.g. image_proj/kernel: weights \[32, 32\], "
      r"config implies \[64, 32\]")):
    init_from.read(config)


def test_a_missing_or_broken_export_is_refused_naming_init_from(tiny_reference_run, tmp_path):
  config = _config(tiny_reference_run)
  config.init_from = str(tmp_path / "nowhere")
  with pytest.raises(common.ConfigError, match="config.init_from: bad export .*nowhere: not a directory"):
    init_from.read(config)
  (tmp_path / "empty").mkdir()
  config.init_from = str(tmp_path / "empty")
  with pytest.raises(common.ConfigError, match="config.init_from: bad export .*: missing files"):
    init_from.read(config)


def test_a_workdir_with_another_tokenizer_is_refused(tiny_reference_run, tmp_path):
  """A workdir started without init_from (its own tokenizer) cannot be
  continued from an export: the token ids would mean other pieces."""
  config = _config(tiny_reference_run)
  (tmp_path / "tokenizer.model").write_bytes(b"another tokenizer")
  weights = init_from.read(config)
  with pytest.raises(common.ConfigError, match="config.init_from: .*tokenizer.model is not the "
                                               "export's tokenizer"):
    train.prepare_inputs(config, str(tmp_path), weights.tokenizer_bytes)
