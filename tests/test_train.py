"""End-to-end: a short CPU training run learns held-out structure."""

import json
import os

import numpy as np
import pytest

from configs import tiny_cpu
from ito_jax import train
from ito_jax.metrics import read_jsonl


def short_config():
  c = tiny_cpu.get_config()
  c.total_steps = 200
  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.batch_size = 64
  c.optim.warmup_steps = 20
  c.data.num_train = 2000
  c.data.num_eval = 200
  c.eval.batch_size = 200
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("train"))
  result = train.train_and_evaluate(short_config(), workdir)
  return workdir, result


@pytest.mark.slow
def test_loss_falls_and_heldout_retrieval_beats_chance(trained):
  workdir, result = trained
  logged = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in logged] == list(range(25, 201, 25))
  first, last = logged[0]["loss"], logged[-1]["loss"]
  assert last < 0.8 * first, (first, last)
  chance = result["retrieval/r1_chance"]  # 1/200
  assert result["retrieval/i2t_r1"] > 5 * chance
  assert result["retrieval/t2i_r1"] > 5 * chance
  assert result["zeroshot/accuracy"] > 3 * result["zeroshot/chance"]


@pytest.mark.slow
def test_run_writes_metrics_and_eval_files(trained):
  workdir, result = trained
  with open(os.path.join(workdir, "eval.json")) as f:
    on_disk = json.load(f)
  assert on_disk == pytest.approx(result)
  for key in ("zeroshot/accuracy", "retrieval/i2t_r1", "retrieval/t2i_r1", "gap/centroid_distance"):
    assert key in on_disk
  record = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
  for key in ("step", "loss", "learning_rate", "temperature", "grad_norm", "examples_per_sec"):
    assert np.isfinite(record[key]), key
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
