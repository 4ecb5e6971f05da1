"""Preemption safety: interrupted runs resume exactly, checkpoints survive a
kill mid-save, SIGTERM saves and exits, and a checkpoint restores onto a
different mesh.

One workdir goes through four interruptions, each followed by a rerun of the
same command (tests/tiny_run.py: 16 steps, checkpoint every 4, a loss line
every step); every rerun's metrics must equal, bit for bit, those of the
uninterrupted reference run (`tiny_reference_run`):

  run 1  SIGKILL at kill point A: after step 5 (checkpoint 4 complete)
  run 2  resumes from 4; SIGKILL while it is writing checkpoint 8
  run 3  resumes from 4 again; SIGKILL at kill point B: after step 10 (checkpoint 8 complete)
  run 4  resumes from 8; SIGTERM -> saves the current step and exits 0
  run 5  resumes from that step and finishes

Kill points are made exact by tests/train_harness.py, which can pause a run
between steps (background checkpoint writes go on) or inside a save.
"""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import tiny_run
from ito_jax import checkpoint, cli

pytestmark = pytest.mark.slow
STEP_DELAY = "0.1"  # seconds per step in interrupted runs, so kills land mid-run


@pytest.fixture(scope="module")
def interrupted(tiny_reference_run, tmp_path_factory):
  """Runs the five-run scenario above; returns what each run left behind."""
  ref = tiny_reference_run
  base = tmp_path_factory.mktemp("interrupted")
  workdir = str(base / "run")
  argv = tiny_run.train_args(workdir, ref["data_dir"])
  env = tiny_run.env(ref["cache_dir"])
  stages = {}

  def log(name):
    return str(base / f"{name}.log")

  def logged_at_least(step):
    return lambda: max(tiny_run.logged_steps(workdir), default=0) >= step

  paused = os.path.join(workdir, "paused")

  def kill_when_paused(proc, checkpoint):
    tiny_run.wait_until(proc, lambda: os.path.exists(paused) and
                        checkpoint in tiny_run.final_checkpoints(workdir),
                        f"the pause with checkpoint {checkpoint} complete")
    tiny_run.kill(proc)
    os.remove(paused)

  # run 1: kill point A, after step 5
  proc = tiny_run.start(argv, {**env, "ITO_TEST_PAUSE_AFTER_STEPS": "5"}, log("run1"), harness=True)
  kill_when_paused(proc, 4)
  stages["run1"] = dict(records=tiny_run.records(workdir), latest=max(tiny_run.final_checkpoints(workdir)))

  # run 2: resumes, then is killed while checkpoint 8 is being written
  proc = tiny_run.start(argv, {**env, "ITO_TEST_HOLD_SAVE_STEP": "8"}, log("run2"), harness=True)
  held = os.path.join(workdir, "save_held")
  tiny_run.wait_until(proc, lambda: os.path.exists(held), "the save of step 8 to start")
  at_kill = tiny_run.checkpoints(workdir)
  tiny_run.kill(proc)
  os.remove(held)
  stages["run2"] = dict(records=tiny_run.records(workdir), resumed=tiny_run.resumed_from(log("run2")),
                        dirs_at_kill=at_kill, latest=max(tiny_run.final_checkpoints(workdir)))

  # run 3: kill point B, after step 10 (it restarts at 5: six steps)
  proc = tiny_run.start(argv, {**env, "ITO_TEST_PAUSE_AFTER_STEPS": "6"}, log("run3"), harness=True)
  kill_when_paused(proc, 8)
  stages["run3"] = dict(records=tiny_run.records(workdir), resumed=tiny_run.resumed_from(log("run3")),
                        latest=max(tiny_run.final_checkpoints(workdir)))

  # run 4: SIGTERM once it has trained a step past its restart point (the
  # "resuming" line comes after old lines are truncated, so steps seen after it are new)
  proc = tiny_run.start(argv, {**env, "ITO_TEST_STEP_DELAY": STEP_DELAY}, log("run4"), harness=True)
  tiny_run.wait_until(proc, lambda: tiny_run.resumed_from(log("run4")) is not None and
                      logged_at_least(stages["run3"]["latest"] + 1)(), "a step after the restart")
  os.kill(proc.pid, signal.SIGTERM)
  rc = tiny_run.finish(proc)
  stages["run4"] = dict(records=tiny_run.records(workdir), resumed=tiny_run.resumed_from(log("run4")),
                        rc=rc, output=pathlib.Path(log("run4")).read_text(),
                        checkpoints=tiny_run.final_checkpoints(workdir))

  # run 5: to the end, with the plain command
  rc = tiny_run.run(argv, tiny_run.env(ref["cache_dir"]), log("run5"))
  stages["run5"] = dict(records=tiny_run.records(workdir), resumed=tiny_run.resumed_from(log("run5")),
                        rc=rc, output=pathlib.Path(log("run5")).read_text())
  stages["workdir"] = workdir
  return stages


def reference_records(ref):
  return tiny_run.records(ref["workdir"])


def assert_prefix_of_reference(records, ref, min_step):
  expected = reference_records(ref)[:len(records)]
  assert max(r["step"] for r in records) >= min_step
  for got, want in zip(records, expected):
    assert got == want, f"step {got['step']}: {got} != {want}"


def test_sigkill_at_first_kill_point_resumes_exactly(interrupted, tiny_reference_run):
  run1, run2 = interrupted["run1"], interrupted["run2"]
  assert run1["latest"] == 4
  assert max(r["step"] for r in run1["records"]) == 5
  assert run2["resumed"] == 4  # not a fresh start that would match trivially
  # run 2 retrained steps 5.. (its lines replaced run 1's) and reached the save of step 8
  assert_prefix_of_reference(run2["records"], tiny_reference_run, min_step=8)


def test_kill_during_save_leaves_previous_checkpoint_loadable(interrupted, tiny_reference_run):
  run2, run3 = interrupted["run2"], interrupted["run3"]
  # killed mid-save: step 8 existed only as orbax's temporary directory
  assert any(d.startswith("8.orbax-checkpoint-tmp") for d in run2["dirs_at_kill"]), run2["dirs_at_kill"]
  assert "8" not in run2["dirs_at_kill"]
  assert run2["latest"] == 4
  assert run3["resumed"] == 4
  assert_prefix_of_reference(run3["records"], tiny_reference_run, min_step=10)


def test_sigkill_at_second_kill_point_resumes_exactly(interrupted, tiny_reference_run):
  run3, run4 = interrupted["run3"], interrupted["run4"]
  assert run3["latest"] == 8
  assert max(r["step"] for r in run3["records"]) == 10
  assert run4["resumed"] == 8
  assert_prefix_of_reference(run4["records"], tiny_reference_run, min_step=9)


def test_sigterm_saves_and_exits_cleanly(interrupted, tiny_reference_run):
  run4, run5 = interrupted["run4"], interrupted["run5"]
  assert run4["rc"] == 0, run4["output"][-2000:]
  assert "Preempted: checkpoint of step" in run4["output"]
  assert "Traceback" not in run4["output"]
  step = int(run4["output"].split("Preempted: checkpoint of step")[1].split()[0])
  assert 9 <= step < tiny_run.TOTAL_STEPS
  assert max(run4["checkpoints"]) == step  # saved on the way out, not only on schedule
  assert max(r["step"] for r in run4["records"]) == step
  assert run5["resumed"] == step


def test_interrupted_run_equals_uninterrupted_run(interrupted, tiny_reference_run):
  run5 = interrupted["run5"]
  assert run5["rc"] == 0, run5["output"][-2000:]
  got, want = run5["records"], reference_records(tiny_reference_run)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert got == want  # losses, gradients, learning rate, eval metrics: bit for bit
  workdir = interrupted["workdir"]
  with open(os.path.join(workdir, "eval.json")) as f, \
      open(os.path.join(tiny_reference_run["workdir"], "eval.json")) as g:
    assert json.load(f) == json.load(g)
  assert tiny_run.final_checkpoints(workdir) == [12, 16]  # keep_checkpoints = 2
  assert not [d for d in tiny_run.checkpoints(workdir) if "tmp" in d]


def test_restore_onto_a_different_mesh(tiny_reference_run):
  """The 1-device checkpoint restores onto 2 devices, as fsdp = 2 (parameters
  and Adam moments split) and as data = 2, with identical values and data
  position, and init_from places the run's export on fsdp = 2
  (tests/mesh_restore_check.py)."""
  ref = tiny_reference_run
  out = subprocess.run(
      [sys.executable, os.path.join(tiny_run.ROOT, "tests", "mesh_restore_check.py"),
       ref["workdir"], ref["data_dir"]], cwd=tiny_run.ROOT, capture_output=True, text=True,
      timeout=tiny_run.TIMEOUT, env=tiny_run.env(ref["cache_dir"], devices=2))
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["device_count"] == 2 and report["step"] == tiny_run.TOTAL_STEPS
  for name, mesh in report["meshes"].items():
    assert mesh["step"] == tiny_run.TOTAL_STEPS, name
    assert mesh["names_equal"] and mesh["unequal"] == [], (name, mesh["unequal"][:5])
    assert mesh["devices"] == [0, 1], name
    assert mesh["next_batch_equal"], name
  fsdp, data = report["meshes"]["fsdp=2"], report["meshes"]["data=2"]
  assert fsdp["kernel_spec"] == fsdp["adam_mu_spec"] == "P('fsdp', None)"
  assert fsdp["split_arrays"] > 50, fsdp  # most kernels and their moments are split in two
  assert data["split_arrays"] == 0 and data["kernel_spec"] == "P('fsdp', None)"
  placed = report["init_from"]  # the export loaded by init_from onto fsdp = 2
  assert placed["names_equal"] and placed["unequal"] == [], placed
  assert placed["kernel_spec"] == "P('fsdp', None)" and placed["devices"] == [0, 1]


def _restore_with_data(ref, workdir, config, checkpointer_config=None):
  """Restores the latest checkpoint in `workdir` onto `config`'s model with
  `config`'s data stream (the Checkpointer judges the saved position against
  `checkpointer_config`, default `config`). Returns (step, the absl warnings
  logged, whether the stream's next batch is a fresh stream's first)."""
  from absl import logging as absl_logging
  from ito_jax import sharding, train
  from ito_jax.data import pipeline

  mesh = sharding.make_mesh(config)
  _, abstract = train.abstract_model_and_optimizer(config, mesh)
  _, tokenizer = train.prepare_inputs(config, ref["workdir"])
  data = iter(pipeline.train_dataset(config, tokenizer, data_dir=ref["data_dir"]))
  fresh = iter(pipeline.train_dataset(config, tokenizer, data_dir=ref["data_dir"]))
  warnings = []
  handler = logging.Handler()
  handler.emit = lambda record: warnings.append(record.getMessage())
  absl_logging.get_absl_logger().addHandler(handler)
  try:
    ckpt = checkpoint.Checkpointer(str(workdir), checkpointer_config or config, read_only=True)
    _, step = ckpt.restore(abstract, data)
    first, expected = next(data), next(fresh)
  finally:
    absl_logging.get_absl_logger().removeHandler(handler)
    for it in (data, fresh):
      if hasattr(it, "close"):
        it.close()
  restarted = all(np.array_equal(first[k], expected[k]) for k in ("images", "tokens"))
  return step, warnings, restarted


def test_resume_with_grain_workers_restarts_the_data_stream_instead_of_crashing(tiny_reference_run):
  """The reference run saved the in-process pipeline's position; with
  data.num_workers = 1 the iterator's state has another structure (one per
  worker), which grain cannot take. The model and optimizer resume, the data
  stream restarts from its seed, and a warning names the field."""
  ref = tiny_reference_run
  config = tiny_run.config(ref["data_dir"])
  config.data.num_workers = 1
  step, warnings, restarted = _restore_with_data(ref, ref["workdir"], config)
  assert step == tiny_run.TOTAL_STEPS
  assert any("data.num_workers (checkpoint 0, now 1)" in w and "restarts from its seed" in w
             for w in warnings), warnings
  assert restarted


def test_an_older_data_format_of_a_mixed_source_run_restarts_the_stream(tiny_reference_run, tmp_path):
  """Checkpoints without `data_format` mixed several sources as one MapDataset,
  whose position grain cannot restore into the iterator mix (KeyError
  'parents'); a run of one source has the same position either way.

  End to end: the reference run's last checkpoint, rewritten as an older
  ito_jax wrote it for two sources (no `data_format` in its meta), restores
  its model, and its data stream restarts with a warning naming the format."""
  two = {"data": {"sources": [["/a", 1.0], ["/b", 1.0]], "num_workers": 0}, "partial": {"enabled": False}}
  one = {"data": {"sources": ["/a"], "num_workers": 0}, "partial": {"enabled": False}}
  assert checkpoint.data_layout_changes(two, two) == []
  assert checkpoint.data_layout_changes(one, one, saved_format=1) == []

  ref = tiny_reference_run
  workdir = tmp_path / "old"
  shutil.copytree(os.path.join(ref["workdir"], "checkpoints"), workdir / "checkpoints")
  step_dir = workdir / "checkpoints" / str(tiny_run.TOTAL_STEPS)
  sources = [["/a", 1.0], ["/b", 1.0]]  # the restore never reads them
  for item, edit in (("meta", lambda m: m.pop("data_format")),
                     ("config", lambda c: c["data"].update(sources=sources))):
    path = step_dir / item / "metadata"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))

  mixed = tiny_run.config(ref["data_dir"])
  mixed.data.sources = tuple(tuple(s) for s in sources)
  # The data stream is the saved one's (one source); the Checkpointer sees the two.
  step, warnings, restarted = _restore_with_data(ref, workdir, tiny_run.config(ref["data_dir"]), mixed)
  assert step == tiny_run.TOTAL_STEPS
  assert any(f"data position format 1 (an older ito_jax mixed several sources differently), "
             f"now {checkpoint.DATA_FORMAT}" in w and "restarts from its seed" in w
             for w in warnings), warnings
  assert restarted


def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_field(tiny_reference_run):
  """Restoring onto a model with half the embedding width fails before
  orbax reads anything, naming the arrays and the config field that differ."""
  from ito_jax import sharding, train

  ref = tiny_reference_run
  config = tiny_run.config(ref["data_dir"])
  config.model.embed_dim //= 2
  mesh = sharding.make_mesh(config)
  _, abstract = train.abstract_model_and_optimizer(config, mesh)
  ckpt = checkpoint.Checkpointer(ref["workdir"], config, read_only=True)
  with pytest.raises(cli.BadArgument, match=r"does not fit this run's model .*arrays differ.*"
                     r"Config fields that differ: model\.embed_dim \(checkpoint 32, now 16\)\."):
    ckpt.restore(abstract)


def test_total_steps_below_the_latest_checkpoint_is_refused(tiny_reference_run, tmp_path):
  """Otherwise the run trains nothing and exports the later checkpoint's
  model labelled with the smaller total_steps. The refusal leaves the
  workdir's config.json as it was."""
  from configs import common
  from ito_jax import train

  ref = tiny_reference_run
  workdir = str(tmp_path / "run")
  shutil.copytree(ref["workdir"], workdir)
  before = pathlib.Path(workdir, "config.json").read_text()
  config = tiny_run.config(ref["data_dir"])
  config.total_steps = tiny_run.TOTAL_STEPS // 2
  with pytest.raises(common.ConfigError, match=f"config.total_steps: {config.total_steps} is below "
                     f"step {tiny_run.TOTAL_STEPS} of the latest checkpoint"):
    train.train_and_evaluate(config, workdir)
  assert pathlib.Path(workdir, "config.json").read_text() == before


def test_close_waits_for_the_start_up_cleanup_of_temporary_directories(tmp_path, monkeypatch):
  """The manager removes half-written saves of earlier runs in a background
  thread; close() returns only once that has finished, so a run refused right
  after start-up does not exit under it (which logged a traceback)."""
  import asyncio
  from orbax.checkpoint import checkpoint_manager

  finished = []

  async def slow_cleanup(directory, **kwargs):
    await asyncio.sleep(0.5)
    finished.append(str(directory))

  monkeypatch.setattr(checkpoint_manager.temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert finished == []  # still running in the background
  ckpt.close()
  assert finished == [str(ckpt.directory)]


def test_a_saved_config_with_a_field_this_version_lacks_is_a_one_line_error():
  """A workdir written by a newer ito_jax: refused naming the field, as a
  command-line mistake (no traceback), not a bug."""
  with pytest.raises(cli.BadArgument, match="saved config has a field this version does not know: "
                     ".*model_v9"):
    checkpoint.config_from_json({"model_v9": 1})
