"""The OT comparison command (issue 4): ot_compare's runs, seeds, resume and
tables, and `ablate` dispatching to it for a partially aligned config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import ot_partial_tiny_cpu
from ito_jax import ablate, ot_compare, train
from partial_helpers import micro_config


@pytest.mark.slow
def test_ot_compare_writes_one_row_per_run(tmp_path):
  c = micro_config(**{"total_steps": 3, "log_every_steps": 3, "eval_every_steps": 3,
                      "data.num_train": 300, "data.num_eval": 40, "eval.batch_size": 40,
                      "partial.aligned_fraction": 0.2})
  rows = ot_compare.compare(c, str(tmp_path), ["contrastive", "loop"], [0.2])
  assert [r["run"] for r in rows] == ["contrastive", "loop"]
  with open(tmp_path / "ablation.json") as f:
    saved = json.load(f)
  assert [r["eval"]["step"] for r in saved["runs"]] == [3, 3]
  assert "loss/ot" not in saved["runs"][0]["eval"]
  logged = [json.loads(l) for l in open(tmp_path / "rho0.2_loop" / "metrics.jsonl")]
  assert "loss/ot" in logged[0] and "loss/ot" not in json.loads(
      open(tmp_path / "rho0.2_contrastive" / "metrics.jsonl").readline())
  md = (tmp_path / "ablation.md").read_text()
  assert "ZS unseen" in md and md.count("\n") == 4  # header, rule, two runs
  # Both runs read one tokenizer.
  tok = lambda run: (tmp_path / run / "tokenizer.model").read_bytes()
  assert tok("rho0.2_contrastive") == tok("rho0.2_loop")


@pytest.mark.slow
def test_ot_compare_over_seeds_reports_mean_and_std_and_resumes(tmp_path):
  c = micro_config(**{"total_steps": 2, "log_every_steps": 2, "eval_every_steps": 2,
                      "data.num_train": 300, "data.num_eval": 40, "eval.batch_size": 40,
                      "partial.aligned_fraction": 0.2})
  rows = ot_compare.compare(c, str(tmp_path), ["contrastive"], [0.2], seeds=[0, 5])
  assert (tmp_path / "rho0.2_contrastive" / "eval.json").exists()  # the config's seed (0)
  assert (tmp_path / "rho0.2_contrastive_seed5" / "eval.json").exists()
  (row,) = rows
  assert row["workdirs"] == [str(tmp_path / "rho0.2_contrastive"), str(tmp_path / "rho0.2_contrastive_seed5")]
  per_seed = row["eval"]["per_seed"]
  key = "zeroshot/unseen_accuracy"
  values = [per_seed["0"][key], per_seed["5"][key]]
  assert row["eval"][key] == pytest.approx(np.mean(values))
  assert row["eval"]["std/" + key] == pytest.approx(np.std(values))
  assert per_seed["0"]["retrieval/i2t_r1"] != per_seed["5"]["retrieval/i2t_r1"] or \
      per_seed["0"]["gap/centroid_distance"] != per_seed["5"]["gap/centroid_distance"]  # really two runs
  assert " ± " in (tmp_path / "ablation.md").read_text()
  # A second call reads the finished runs back instead of training them again.
  again = ot_compare.compare(c, str(tmp_path), ["contrastive"], [0.2], seeds=[0, 5])
  assert again[0]["eval"] == row["eval"]
  assert again[0]["train_minutes"] == row["train_minutes"] > 0  # recorded in the run dirs
  # A finished run of another config is not mixed into the table.
  c.optim.learning_rate = 0.5 * c.optim.learning_rate
  with pytest.raises(ValueError, match=r"rho0.2_contrastive: finished earlier with another config "
                                       r"\(optim.learning_rate differ\)"):
    ot_compare.compare(c, str(tmp_path), ["contrastive"], [0.2], seeds=[0, 5])


@pytest.mark.slow
def test_ablate_command_runs_the_ot_comparison_for_a_partial_config(tmp_path):
  """`python -m ito_jax.ablate --config=configs/ot_partial_tiny_cpu.py` is the
  issue's command: with partial.enabled it dispatches to ot_compare."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "ito_jax.ablate", "--config=configs/ot_partial_tiny_cpu.py:runlocal",
         f"--workdir={tmp_path}", "--variants=contrastive", "--aligned_fractions=0.2",
         "--config.total_steps=2", "--config.eval_every_steps=2", "--config.log_every_steps=2"]
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert [(r["aligned_fraction"], r["run"]) for r in saved["runs"]] == [(0.2, "contrastive")]
  assert "ZS unseen" in (tmp_path / "ablation.md").read_text()



def test_ot_compare_contrastive_run_turns_off_every_ot_term():
  base = ot_partial_tiny_cpu.get_config()
  base.loss.ot_plan_contrast_weight = 1.0
  contrastive = ot_compare.run_config(base, "contrastive", 0.2, "/data")
  assert contrastive.loss.ot_weight == 0.0 and contrastive.loss.ot_plan_contrast_weight == 0.0
  assert contrastive.partial.aligned_fraction == 0.2 and contrastive.data.data_dir == "/data"
  bary = ot_compare.run_config(base, "barycenter", 0.05, "/data")
  assert bary.ot.variant == "barycenter" and bary.loss.ot_weight == base.loss.ot_weight
  assert bary.loss.ot_plan_contrast_weight == 1.0


def test_a_preempted_run_stops_the_comparison_before_any_table(tmp_path, monkeypatch):
  """train_and_evaluate returns {"preempted": True} at a preemption signal
  (its checkpoint saved): the comparison must not start the next run, nor
  write a table holding a run that did not finish."""
  trained = []

  def preempted(config, run_dir):
    trained.append(os.path.basename(run_dir))
    return {"step": 7, "preempted": True}

  monkeypatch.setattr(train, "train_and_evaluate", preempted)
  c = micro_config(**{"partial.aligned_fraction": 0.2})
  with pytest.raises(ablate.Preempted, match=r"rho0.2_contrastive: preempted, checkpoint of step 7 saved; "
                                             r"rerun the same command to resume"):
    ot_compare.compare(c, str(tmp_path), ["contrastive", "loop"], [0.2])
  assert trained == ["rho0.2_contrastive"]
  assert not (tmp_path / "ablation.json").exists() and not (tmp_path / "ablation.md").exists()
  # The minutes it trained are kept for the invocation that resumes it.
  assert json.loads((tmp_path / "rho0.2_contrastive" / "train_minutes.json").read_text())["minutes"] >= 0


def test_python_m_ablate_exits_cleanly_when_an_ot_run_is_preempted(tmp_path):
  """`python -m ito_jax.ablate` on a partially aligned config: ot_compare
  raises ito_jax.ablate.Preempted, and the program must print it and exit 0
  (a scheduler requeues on 0), not die on a Preempted of another class
  object (the __main__ module's)."""
  code = (
      "import runpy, sys\n"
      "from ito_jax import train\n"
      "train.train_and_evaluate = lambda config, run_dir: {'step': 7, 'preempted': True}\n"
      f"sys.argv = ['ablate', '--config=configs/ot_partial_tiny_cpu.py:runlocal', "
      f"'--workdir={tmp_path}', '--variants=contrastive', '--aligned_fractions=0.1']\n"
      "runpy.run_module('ito_jax.ablate', run_name='__main__', alter_sys=True)\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Preempted: " in out.stdout and "checkpoint of step 7 saved" in out.stdout, out.stdout
  assert not (tmp_path / "ablation.md").exists()
