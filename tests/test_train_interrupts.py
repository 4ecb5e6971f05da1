"""What the training loop keeps when a run stops early, in process on the
tiny ITO config of tests/tiny_run.py: an error after a checkpoint has started
saving leaves that checkpoint complete (the rerun resumes from it), a
preempted run writes the counts since its last log line at the step it stops,
a preemption at an evaluation step saves before it evaluates, steps still
running when an evaluation starts stay on the training clock, and a second
SIGTERM stops a run that never reaches a step boundary.
The kill/resume scenarios as subprocesses are in tests/test_checkpoint.py."""

import signal
import threading

import jax.numpy as jnp
import pytest

import tiny_run
from ito_jax import checkpoint, metrics, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("interrupts_data"))


def config(data_dir, **overrides):
  c = tiny_run.config(data_dir)
  c.update(overrides)
  return c


def loss_lines(workdir):
  return [r for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r]


def test_an_error_after_a_save_began_leaves_that_checkpoint_complete(data_dir, tmp_path, monkeypatch):
  """The save of step 4 runs in the background when step 5 fails: the loop
  waits for it (and closes the checkpoint manager, the metrics writer and the
  data iterator) before the error goes up, so the rerun resumes at step 4
  instead of deleting a half-written step and starting again."""
  real_check, closed = train.check_progress, []

  def failing(metrics_, step, steps_since_log):
    real_check(metrics_, step, steps_since_log)
    if step == 5:
      raise FloatingPointError("injected at step 5")

  real_close = checkpoint.Checkpointer.close

  def recorded_close(self):
    real_close(self)
    closed.append(self.all_steps())

  monkeypatch.setattr(train, "check_progress", failing)
  monkeypatch.setattr(checkpoint.Checkpointer, "close", recorded_close)
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="injected at step 5"):
    train.train_and_evaluate(config(data_dir, total_steps=6), workdir)
  assert closed == [[4]]  # closed once, with step 4 written in full
  assert tiny_run.checkpoints(workdir) == ["4"]  # no orbax-checkpoint-tmp left behind

  monkeypatch.setattr(train, "check_progress", real_check)
  result = train.train_and_evaluate(config(data_dir, total_steps=6), workdir)
  assert result["step"] == 6
  assert [r["step"] for r in loss_lines(workdir)] == list(range(1, 7))
  assert checkpoint.Checkpointer(workdir).all_steps() == [4, 6]


def test_a_preempted_run_logs_the_counts_since_its_last_log_line(data_dir, tmp_path, monkeypatch):
  """Logged every second step, preempted at step 3 and resumed to step 4, with
  one counted event per step (ot/unconverged, summed between log lines): the
  lines of steps 2, 3 and 4 carry 2, 1 and 1, so no step's count is lost."""
  real_step = train.make_train_step

  def counting(*args, **kwargs):
    step = real_step(*args, **kwargs)

    def counted(state, batch):
      state, out = step(state, batch)
      return state, {**out, "ot/unconverged": jnp.float32(1.0)}
    counted.lower = step.lower  # the loop compiles a step ahead of its first call
    return counted

  monkeypatch.setattr(train, "make_train_step", counting)
  monkeypatch.setattr(checkpoint.PreemptionWatch, "reached", lambda self, step, ckpt: step == 3)
  workdir = str(tmp_path / "run")
  c = config(data_dir, total_steps=4, log_every_steps=2, checkpoint_every_steps=1000)
  assert train.train_and_evaluate(c, workdir) == {"step": 3, "preempted": True}
  monkeypatch.setattr(checkpoint.PreemptionWatch, "reached", lambda self, step, ckpt: False)
  train.train_and_evaluate(c, workdir)
  assert [(r["step"], r["ot/unconverged"]) for r in loss_lines(workdir)] == [(2, 2.0), (3, 1.0),
                                                                              (4, 1.0)]


def test_a_preemption_at_an_evaluation_step_saves_before_it_evaluates(data_dir, tmp_path, monkeypatch):
  """The grace period after SIGTERM is short: the checkpoint save starts
  before that step's evaluation, which still runs and is logged."""
  from ito_jax.evaluate import evaluator
  order = []
  real_save, real_eval = checkpoint.Checkpointer.save, evaluator.Evaluator.run

  def save(self, step, *args, **kwargs):
    order.append(("save", step))
    return real_save(self, step, *args, **kwargs)

  def evaluate(self, model):
    order.append(("evaluate", None))
    return real_eval(self, model)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  monkeypatch.setattr(evaluator.Evaluator, "run", evaluate)
  monkeypatch.setattr(checkpoint.PreemptionWatch, "reached", lambda self, step, ckpt: step == 2)
  workdir = str(tmp_path / "run")
  c = config(data_dir, total_steps=4, eval_every_steps=2, checkpoint_every_steps=1000)
  assert train.train_and_evaluate(c, workdir) == {"step": 2, "preempted": True}
  assert order == [("save", 2), ("evaluate", None)]
  assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")
          if any(k.startswith("retrieval/") for k in r)] == [2]


def test_steps_still_running_when_evaluation_starts_count_as_training(data_dir, tmp_path, monkeypatch):
  """Steps are dispatched ahead of the device. Each step here takes 0.4 s on
  the device (a host callback sleeps), and the evaluation at step 5 starts
  while steps 4 and 5 still run: that wait is training, so the line of steps
  4-6 reads at most 3 / 1.2 s, not 3 steps over the 0.4 s outside evaluation."""
  import time
  import jax
  real_step = train.make_train_step

  def slow(*args, **kwargs):
    step = real_step(*args, **kwargs)

    def wait(x):
      time.sleep(0.4)
      return x

    @jax.jit  # a second program after the step, dispatched as asynchronously as the step
    def delay(loss, state):
      loss = jax.pure_callback(wait, jax.ShapeDtypeStruct((), jnp.float32), loss)
      # The parameters wait for the sleep too (0 * loss: a data dependency, no change).
      return loss, jax.tree.map(
          lambda x: x + 0 * loss.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)

    def slowed(state, batch):
      state, out = step(state, batch)
      loss, state = delay(out["loss"], state)
      return state, {**out, "loss": loss}
    slowed.lower = step.lower  # the loop compiles a step ahead of its first call
    return slowed

  monkeypatch.setattr(train, "make_train_step", slow)
  workdir = str(tmp_path / "run")
  c = config(data_dir, total_steps=6, log_every_steps=3, eval_every_steps=5, checkpoint_every_steps=1000)
  train.train_and_evaluate(c, workdir)
  (line,) = [r for r in loss_lines(workdir) if r["step"] == 6]
  assert line["steps_per_sec"] <= 3 / 1.2, line["steps_per_sec"]


def test_a_second_sigterm_before_the_step_ends_stops_at_once():
  """The first SIGTERM asks for a checkpoint at the next step boundary; a run
  that never reaches one (stuck reading data) stops at the second, exit
  status 143, and the previous handler is back afterwards."""
  assert threading.current_thread() is threading.main_thread()  # signal handlers need it
  previous = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionWatch() as watch:
    signal.raise_signal(signal.SIGTERM)
    assert watch.requested.is_set()
    with pytest.raises(SystemExit) as stopped:
      signal.raise_signal(signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == previous
