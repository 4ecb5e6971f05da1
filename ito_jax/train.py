"""The trainer: one jitted, sharded step function and the loop around it.

Reads top to bottom: optimizer, state, step, inputs, loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import nnx
from tqdm import tqdm

from configs import common
from ito_jax import accumulation, checkpoint, distributed, export, init_from, objective, sharding
from ito_jax.data import pipeline
from ito_jax.data import tokenizer as tokenizer_lib
from ito_jax.evaluate import embeddings
from ito_jax.evaluate.evaluator import Evaluator
from ito_jax.metrics import MetricsWriter, is_remote
from ito_jax.models.ito import MAX_LOG_SCALE, ItoModel, trainable_filter

# =============================================================================
# Optimizer: AdamW, warmup + cosine, clipping, decay on kernels/embeddings only
# =============================================================================
_DECAYED = ("kernel", "embedding", "pos_embedding")


def decay_mask(params):
  """True for leaves that get weight decay: matrices and embeddings, never
  norms, biases or the temperature/bias scalars. Decided by name, because
  scanned layers give biases a leading `layers` axis."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], "key", path[-1])) in _DECAYED, params)


def learning_rate_schedule(config: ml_collections.ConfigDict):
  o = config.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=max(config.total_steps, o.warmup_steps + 1),
      end_value=o.learning_rate * o.end_learning_rate_factor)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  adamw = optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  if o.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
  return adamw


# =============================================================================
# State: model + optimizer, created sharded on the mesh
# =============================================================================
def create_model_and_optimizer(config: ml_collections.ConfigDict, mesh, check: bool = True):
  """Builds the model and its optimizer with parameters placed by their
  logical axis names on `mesh`. `check=False` skips sharding.check_divisible
  for a caller that has run it on this config and mesh."""
  if check:
    sharding.check_divisible(config, mesh)  # a clear error instead of a failed device_put
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules(config)):
    model = ItoModel(config.model, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(config),
                              wrt=trainable_filter(config.optim.locked))
  return model, optimizer


def abstract_model_and_optimizer(config: ml_collections.ConfigDict, mesh, check: bool = True):
  """(graphdef, state) like create_model_and_optimizer's, but the state holds
  only shapes, dtypes and shardings on `mesh`: a restore target that
  allocates nothing. `check` as there."""

  def init():
    model = ItoModel(config.model, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, make_optimizer(config),
                                wrt=trainable_filter(config.optim.locked))

  if check:
    sharding.check_divisible(config, mesh)
  with nnx.logical_axis_rules(sharding.logical_rules(config)):
    return nnx.get_abstract_model(init, mesh)


# =============================================================================
# Step: pure function of (state, batch), jitted with explicit shardings
# =============================================================================
def make_train_step(graphdef, state_shardings, mesh, config: ml_collections.ConfigDict):
  """Returns step(state, batch) -> (state, metrics), donating the old state."""

  def apply_update(state, grads):
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, grads)
    # Cap the logit scale on the parameter, as CLIP does, not only on its
    # output: past the output cap its gradient is zero, so a scale that
    # overshot it could never come down again.
    model.log_scale[...] = jnp.minimum(model.log_scale[...], MAX_LOG_SCALE)
    return nnx.state((model, optimizer))

  schedule = learning_rate_schedule(config)

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    steps_taken = optimizer.step[...]  # gates terms that start mid-run (ot.start_step)
    # The rate this update uses: the schedule reads the optimizer's own count,
    # which a skipped non-finite step leaves behind the loop's step.
    learning_rate = schedule(steps_taken)
    batch = objective.with_patch_dropout(batch, config, steps_taken, mesh)
    (loss, metrics), grads = accumulation.value_and_grad(model, batch, config, mesh,
                                                         step=steps_taken)
    grad_norm = optax.global_norm(grads)
    if config.optim.skip_nonfinite:
      # One NaN or inf anywhere in the gradient makes its global norm
      # non-finite, so this needs no extra pass over the gradient tree. A
      # skipped step leaves everything as it was, the step count included, as
      # optax.apply_if_finite does, but without changing the state's layout.
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      state = jax.lax.cond(finite, apply_update, lambda s, _: s, state, grads)
      metrics["train/nonfinite_steps"] = jnp.logical_not(finite).astype(jnp.int32)
    else:
      state = apply_update(state, grads)
    model, _ = nnx.merge(graphdef, state)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = learning_rate
    metrics["logit_scale"] = model.logit_scale
    metrics["temperature"] = 1.0 / model.logit_scale
    return state, metrics

  batch_sharding = sharding.batch_sharding(mesh)
  return MeshStep(jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                          out_shardings=(state_shardings, sharding.replicated(mesh)),
                          donate_argnums=(0,) if config.model.donate else ()), mesh)


class MeshStep:
  """A jitted step that is traced (on its first call, or by `lower`) with its
  mesh set, so the model's activation constraints (sharding.constrain_batch)
  see the mesh. `jax.set_mesh` cannot be entered inside `jax.jit`."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


# =============================================================================
# Inputs: data set, tokenizer, train iterator and held-out arrays
# =============================================================================
def prepare_inputs(config: ml_collections.ConfigDict, workdir: str,
                   tokenizer_bytes: bytes | None = None):
  """Builds (once) the data set and the tokenizer the run uses; returns
  (data_dir, tokenizer). The tokenizer is trained on the training captions, or
  is `tokenizer_bytes` (an init_from export's), and is saved in the workdir,
  so a resumed or exported run reads the same one."""
  if is_remote(workdir) and not config.data.data_dir:
    raise common.ConfigError(
        f"config.data.data_dir: must name a local directory when the workdir is remote "
        f"({workdir}); the data set is built and read on local disk")
  data_dir = config.data.data_dir or os.path.join(workdir, "data")
  tok_path = os.path.join(workdir, "tokenizer.model")
  if tokenizer_bytes is not None:
    if not epath.Path(tok_path).exists():
      tokenizer_lib.save(tokenizer_bytes, tok_path)
    elif epath.Path(tok_path).read_bytes() != tokenizer_bytes:
      raise common.ConfigError(
          f"config.init_from: {tok_path} is not the export's tokenizer (this workdir was "
          f"started without init_from, or from another export); use a new --workdir")
  if epath.Path(tok_path).exists():
    tokenizer = tokenizer_lib.Tokenizer.load(tok_path)
    if tokenizer.vocab_size > config.model.text.vocab_size:  # ids past the table embed as NaN
      raise common.ConfigError(
          f"config.model.text.vocab_size: {config.model.text.vocab_size} is smaller than the "
          f"{tokenizer.vocab_size} pieces of the tokenizer this workdir already holds "
          f"({tok_path}); use the vocab_size it was trained with, or a new --workdir")
    return data_dir, tokenizer
  return data_dir, tokenizer_lib.train_tokenizer(
      pipeline.tokenizer_texts(config, data_dir), tok_path, config.model.text.vocab_size)


# =============================================================================
# Loop
# =============================================================================
# Per-step counts of bad input that a log line must not sample from its own
# step only: summed over the steps since the previous log line (and the worst
# marginal error and barycenter residual taken over them), so a bad step
# between log lines is counted.
SUMMED_METRICS = ("train/nonfinite_steps", "ot/nonfinite_points", "ot/nonfinite_value",
                  "ot/unconverged")
MAXED_METRICS = ("ot/marginal_error", "ot/barycenter_residual")


@jax.jit
def _tally(tally: dict, metrics: dict) -> dict:
  return {k: jnp.add(v, metrics[k]) if k in SUMMED_METRICS else jnp.maximum(v, metrics[k])
          for k, v in tally.items()}


def tally_counts(tally: dict | None, metrics: dict) -> dict:
  """The running SUMMED_METRICS / MAXED_METRICS of one step's `metrics`
  added to `tally` (None: the first step since a log line). Stays on device:
  no host sync per step."""
  step = {k: metrics[k] for k in SUMMED_METRICS + MAXED_METRICS if k in metrics}
  return step if tally is None or not step else _tally(tally, step)


class Throughput:
  """Training speed over the steps since the last log line, with time spent
  outside training (evaluation) left out of the clock."""

  def __init__(self, clock=time.perf_counter):
    self.clock = clock
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = self.clock(), 0

  def step(self) -> None:
    self.steps += 1

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (spent on something other than training) out."""
    self.start += seconds

  def rates(self, batch_size: int) -> dict:
    elapsed = max(self.clock() - self.start, 1e-9)
    return {"examples_per_sec": self.steps * batch_size / elapsed, "steps_per_sec": self.steps / elapsed}


def check_progress(metrics: dict, step: int, steps_since_log: int) -> None:
  """Raises when no step since the previous log line updated the parameters:
  each had a non-finite loss or gradient (optim.skip_nonfinite skipped them),
  so going on would only spin. Occasional skipped steps are counted, not fatal."""
  skipped = int(metrics.get("train/nonfinite_steps", 0))
  if steps_since_log and skipped >= steps_since_log:
    raise FloatingPointError(
        f"steps {step - steps_since_log + 1}-{step}: every step had a non-finite loss or "
        f"gradient norm and was skipped, so the parameters have not changed since step "
        f"{step - steps_since_log} (loss {metrics.get('loss')}, grad_norm "
        f"{metrics.get('grad_norm')}). Lower optim.learning_rate, check the data, or resume "
        f"from an earlier checkpoint")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains for config.total_steps, evaluates periodically, writes
  WORKDIR/metrics.jsonl (+ TensorBoard events in WORKDIR/tensorboard),
  WORKDIR/eval.json, WORKDIR/embeddings.npz (a held-out sample for plots),
  checkpoints in WORKDIR/checkpoints and the encoder-only WORKDIR/export;
  returns the final eval metrics. WORKDIR may be a gs:// path.

  A workdir that holds checkpoints resumes from the latest one. On SIGTERM the
  run saves a checkpoint at the next step boundary and returns
  {"step": step, "preempted": True}."""
  with checkpoint.PreemptionWatch() as preemption:
    return _train_and_evaluate(config, workdir, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        preemption: checkpoint.PreemptionWatch) -> dict:
  common.validate(config, jax.device_count(), jax.process_count(), jax.default_backend())
  mesh = sharding.make_mesh(config)
  sharding.check_divisible(config, mesh)  # before any data is generated or read
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except FileExistsError:  # "[Errno 17] File exists" says less
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory") from None
  ckpt = checkpoint.Checkpointer(workdir, config)
  # Whichever way the loop ends, leaving this block closes what the run holds,
  # the checkpoint manager last: it waits for a save under way, so after an
  # error too that step is complete (left half-written, the next start would
  # delete it and train those steps again).
  preempted_at = None
  with contextlib.ExitStack() as closing:
    closing.push(_closer(ckpt.close))
    latest = ckpt.latest_step()
    if latest is not None and latest > config.total_steps:  # would export it labelled total_steps
      raise common.ConfigError(
          f"config.total_steps: {config.total_steps} is below step {latest} of the latest "
          f"checkpoint in {ckpt.directory}; raise total_steps to at least {latest}, or use a new "
          f"--workdir (`python -m ito_jax.main export` exports that checkpoint as it is)")
    # A fresh run reads (and checks) the export it starts from before any data
    # is generated; a resumed one has it in its checkpoint.
    weights = init_from.read(config) if config.init_from and latest is None else None
    if config.optim.locked and not config.init_from:
      logging.warning("optim.locked=%s without init_from: those towers stay at their random "
                      "initialisation", config.optim.locked)
    data_dir, tokenizer = prepare_inputs(  # refuses a tokenizer that does not fit
        config, workdir, None if weights is None else weights.tokenizer_bytes)
    if jax.process_index() == 0:  # after both refusals, so a refused run leaves the workdir's config
      (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
    train_iter = iter(pipeline.train_dataset(
        config, tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
        data_dir=data_dir))
    if hasattr(train_iter, "close"):
      closing.push(_closer(train_iter.close))
    evaluator = Evaluator(
        config, pipeline.eval_arrays(config, tokenizer, config.eval.split, data_dir=data_dir),
        pipeline.class_names(config, data_dir), tokenizer)

    if latest is None:
      model, optimizer = create_model_and_optimizer(config, mesh, check=False)  # checked above
      if weights is not None:
        init_from.load_into(model, weights)
        logging.info("initialised the encoders from %s (step %s)", config.init_from,
                     weights.manifest.get("step"))
        del weights  # the host copy of the parameters
      graphdef, state = nnx.split((model, optimizer))
      start_step = 0
    else:  # resume: state and data position exactly as saved, on this run's mesh
      graphdef, state = abstract_model_and_optimizer(config, mesh, check=False)
      state, start_step = ckpt.restore(state, train_iter)
      model, optimizer = nnx.merge(graphdef, state)
    state_shardings = sharding.state_shardings(state)
    masked_step = make_train_step(graphdef, state_shardings, mesh, config)
    # FLIP's unmasked tuning: from this step on, every patch (compiled when reached).
    unmasked_from = config.total_steps - config.model.image.unmasked_final_steps + 1
    unmasked_step = None
    writer = MetricsWriter(workdir)
    closing.push(_closer(writer.close))
    writer.truncate_after(start_step)  # a rerun rewrites the steps it trains again
    if start_step:
      logging.warning("resuming from checkpoint step %d in %s", start_step, ckpt.directory)

    eval_metrics: dict = {}
    speed = Throughput()
    bar = tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
               dynamic_ncols=True, disable=jax.process_index() != 0)
    closing.push(_closer(bar.close))
    tally = None  # the counted metrics since the last log line, on device
    compiled = set()  # the step functions compiled so far (masked, unmasked)
    for step in range(start_step + 1, config.total_steps + 1):
      batch = sharding.put_batch(next(train_iter), mesh)
      train_step = masked_step
      if step >= unmasked_from:
        if unmasked_step is None:
          logging.info("steps %d-%d encode every patch (model.image.unmasked_final_steps)",
                       step, config.total_steps)
          unmasked_step = make_train_step(graphdef, state_shardings, mesh,
                                          objective.without_patch_dropout(config))
        train_step = unmasked_step
      if train_step not in compiled:  # compiled off the throughput clock; the call reuses it
        t_compile = time.perf_counter()
        train_step.lower(state, batch).compile()
        if compiled:  # the unmasked step, mid-run
          speed.exclude(time.perf_counter() - t_compile)
        else:  # the clock starts here, after start-up and the first batch too
          speed.restart()
        compiled.add(train_step)
      state, metrics = train_step(state, batch)
      tally = tally_counts(tally, metrics)
      speed.step()
      bar.update(1)
      preempted = preemption.reached(step, ckpt)
      # A preempted run logs its step too: the counts since the last line are
      # not in the checkpoint, and the resumed run's lines start after it.
      if step % config.log_every_steps == 0 or step == config.total_steps or preempted:
        metrics = jax.device_get({**metrics, **tally})  # the loop's only host sync between evals
        tally = None
        check_progress(metrics, step, speed.steps)
        metrics.update(speed.rates(config.batch_size))
        # Bad records skipped, by kind, over all processes (each reads its own shard).
        metrics.update(distributed.sum_over_processes(pipeline.data_metrics(train_iter)))
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        speed.restart()
      if preempted:
        # Saved before this step's evaluation, if it has one: a preemption's grace
        # period is short, and the save's commit runs on while it evaluates.
        ckpt.save(step, state, train_iter, mesh)
      if step % config.eval_every_steps == 0 or step == config.total_steps:
        # Steps are dispatched ahead of the device: let them finish on the
        # training clock, or the evaluation's wait for them would leave it.
        jax.block_until_ready(state)
        t_eval = time.perf_counter()
        nnx.update((model, optimizer), state)
        eval_metrics = evaluator.run(model)
        writer.write(step, eval_metrics)
        speed.exclude(time.perf_counter() - t_eval)  # evaluation time is not training throughput
      if preempted:
        preempted_at = step
        break
      ckpt.maybe_save(step, state, train_iter, mesh)
    else:
      if config.total_steps > start_step:
        ckpt.save(config.total_steps, state, train_iter, mesh)

  if preempted_at is not None:
    logging.warning("preempted: checkpoint of step %d saved; rerun the same command to resume",
                    preempted_at)
    return {"step": preempted_at, "preempted": True}
  nnx.update((model, optimizer), state)
  if not eval_metrics:  # no evaluation ran in this process (0 steps, or resumed at the end)
    eval_metrics = evaluator.run(model)
  eval_metrics = {"step": config.total_steps, **eval_metrics}
  # For plots: a sample of the final evaluation's embeddings (of this model:
  # the last evaluation ran at total_steps), image-caption pairs, so a
  # labels-only set has none.
  held_out = (embeddings.held_out(evaluator.last_embeddings, evaluator.data,
                                  evaluator.retrieval_rows, config.eval.embeddings_limit)
              if evaluator.retrieval else None)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "eval.json").write_text(json.dumps(eval_metrics, indent=2, sort_keys=True))
    if held_out is not None:
      embeddings.save(epath.Path(workdir) / "embeddings.npz", held_out)
  export.export_model(model, config, os.path.join(workdir, "tokenizer.model"),
                      os.path.join(workdir, "export"), step=config.total_steps)
  return eval_metrics


def _closer(close):
  """An ExitStack exit callback that runs `close`. When the block is left by
  an error, an error from `close` is logged instead, so the error that stopped
  the run is the one that goes up."""
  def exit_(exc_type, exc, tb):
    del exc, tb
    if exc_type is None:
      close()
      return False
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      logging.exception("while stopping after an error, %s failed",
                        getattr(close, "__qualname__", close))
    return False
  return exit_
