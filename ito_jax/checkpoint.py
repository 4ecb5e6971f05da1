"""Preemption-safe training checkpoints in WORKDIR/checkpoints (orbax).

Every checkpoint step directory holds four items:

  state   model + optimizer (the nnx state the train step carries: every
          parameter, Adam moment, the optimizer's step count and any RNG
          state), as {"model": ..., "optimizer": ...} of arrays;
  data    the grain iterator's position, one JSON file per process (grain's
          own orbax handler). Augmentation randomness is a function of the seed
          and the record index, so this position is the whole data RNG;
  meta    {"step", "process_count", "device_count", "mesh"} (JSON);
  config  the run's config (JSON), so `export` needs nothing but the workdir.

Why a restart is exact: the step function is deterministic given (state,
batch), the restored state is bit-identical, and the restored iterator yields
the same batches; steps after the restart therefore recompute the same losses.

Why a kill is safe: orbax writes a step into a temporary directory and renames
it only when every item is complete, so a SIGKILL mid-save leaves the previous
step as the latest loadable one; the manager deletes stale temporary
directories when it opens (`cleanup_tmp_directories`).

Restores are onto abstract targets (shape, dtype, sharding) built for the
*current* mesh, so a run may resume on a different device count or mesh
layout. The data position is per process: if the process count changed, the
data stream restarts from its seed (the model and optimizer still resume) and
the run says so.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from configs import common
from ito_jax.cli import BadArgument
from ito_jax.export import flatten


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints, absolute (orbax wants it so); gs:// paths pass through."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir)) / "checkpoints"


# =============================================================================
# nnx state <-> the pure, named tree orbax stores
# =============================================================================
def to_tree(state: nnx.State) -> dict:
  """nnx state of (model, optimizer) -> {"model": {...}, "optimizer": {...}} of arrays."""
  pure = nnx.to_pure_dict(state)
  return {"model": pure[0], "optimizer": pure[1]}


def from_tree(abstract_state: nnx.State, tree: dict) -> nnx.State:
  """Inverse of `to_tree`: fills a (possibly abstract) state with `tree`'s arrays."""
  state = jax.tree.map(lambda x: x, abstract_state)  # a copy; the target stays abstract
  nnx.replace_by_pure_dict(state, {0: tree["model"], 1: tree["optimizer"]})
  return state


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def config_from_json(saved: dict) -> ml_collections.ConfigDict:
  """A locked config from a saved one: fields added to base_config since keep
  their defaults; a saved field that no longer exists raises, naming it."""
  config = common.base_config()
  try:
    config.update(saved)
  except (AttributeError, KeyError) as e:
    raise BadArgument(f"saved config has a field this version does not know: {e}") from e
  return config


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """'field (checkpoint A, now B)' for every field whose value differs."""
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for key in sorted(set(saved) | set(current)):
      out += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
    return out
  return [] if saved == current else [f"{prefix[:-1]} (checkpoint {saved!r}, now {current!r})"]


# Config fields that change the structure of the saved data position: worker
# processes (mp_prefetch keeps one state per worker), the source mixture, and
# partial mode's three zipped streams. Under a change the stream restarts.
DATA_LAYOUT_FIELDS = ("data.num_workers", "data.sources", "partial.enabled")


# The structure of the data position this code saves. 2: several weighted
# sources are mixed as iterators (grain.IterDataset.mix); 1 (no field in the
# checkpoint's meta) mixed them as one MapDataset, whose position does not
# restore into the newer pipeline.
DATA_FORMAT = 2


def data_layout_changes(saved: dict, current: dict, saved_format: int = DATA_FORMAT) -> list[str]:
  """config_differences entries of DATA_LAYOUT_FIELDS, and an older data
  format of a mixed-source pipeline: the changes under which the saved data
  position cannot be restored."""
  sources = (current.get("data") or {}).get("sources") or ()
  out = []
  if saved_format != DATA_FORMAT and len(sources) > 1:
    out.append(f"data position format {saved_format} (an older ito_jax mixed several sources "
               f"differently), now {DATA_FORMAT}")
  for field in DATA_LAYOUT_FIELDS:
    a, b = saved, current
    for key in field.split("."):
      a = a.get(key) if isinstance(a, dict) else None
      b = b.get(key) if isinstance(b, dict) else None
    out += config_differences(a, b, field + ".")
  return out


# =============================================================================
# The manager
# =============================================================================
class Checkpointer:
  """Saves and restores training state in WORKDIR/checkpoints.

    ckpt = Checkpointer(workdir, config)
    if ckpt.latest_step() is not None:
      state, step = ckpt.restore(abstract_state, train_iter)
    ...
    ckpt.maybe_save(step, state, train_iter)   # async, every checkpoint_every_steps
    ckpt.save(step, state, train_iter)         # forced (end of run, preemption)
    ckpt.close()                               # waits for pending writes
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None, *,
               read_only: bool = False):
    self.config = config
    self.every_steps = config.checkpoint_every_steps if config is not None else 0
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if config is not None else None,
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,  # debris of a save that was killed
        enable_async_checkpointing=True)
    self.directory = checkpoint_dir(workdir)
    # PyTree (not Standard) handler for the state: it also restores sub-trees (export).
    handlers = dict(state=ocp.PyTreeCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
                    meta=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # ---- save ------------------------------------------------------------------
  def save(self, step: int, state: nnx.State, data_iter, mesh=None) -> bool:
    """Starts an asynchronous save of `step`; returns once device arrays are
    copied and the data position is written, before the files are complete.
    Returns False when `step` is already saved (orbax raises
    StepAlreadyExistsError under force=True, returns False without)."""
    meta = {"step": int(step), "process_count": jax.process_count(), "data_format": DATA_FORMAT,
            "device_count": jax.device_count(),
            "mesh": dict(mesh.shape) if mesh is not None else None}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(to_tree(state)),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta),
        config=ocp.args.JsonSave(config_to_json(self.config)))
    try:  # force: the schedule is ours (maybe_save), not orbax's save_interval_steps
      saved = self.manager.save(step, args=args, force=True)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      return False  # e.g. the final or preemption save of a step the schedule just saved
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def maybe_save(self, step: int, state: nnx.State, data_iter, mesh=None) -> bool:
    if not self.every_steps or step % self.every_steps:
      return False
    return self.save(step, state, data_iter, mesh)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    # The manager's constructor starts removing earlier runs' half-written
    # temporary directories in a background thread, which only its save()
    # waits for, not close(): a run refused at start-up (a bad source, say)
    # would exit with that thread running, and it logs a traceback when the
    # interpreter shuts down under it. Waited for here, so it has finished.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.wait_until_finished()
    self.manager.close()

  # ---- restore ---------------------------------------------------------------
  def restore(self, abstract_state: nnx.State, data_iter=None, step: int | None = None):
    """Restores (state, step) onto `abstract_state`'s shardings; moves
    `data_iter` to the saved position when the process count is unchanged."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    meta = self.read_json(step, "meta")
    saved = self.read_json(step, "config") if self.config is not None else None
    current = config_to_json(self.config) if self.config is not None else None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_tree(abstract_state))
    self._check_fits(step, target, config_differences(saved, current) if saved is not None else [])
    items = {"state": ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    if data_iter is not None:
      layout = [] if saved is None else data_layout_changes(saved, current, meta.get("data_format", 1))
      if meta["process_count"] != jax.process_count():
        logging.warning(
            "checkpoint step %d was written by %d processes, this run has %d: the model and "
            "optimizer resume, the data stream restarts from its seed.",
            step, meta["process_count"], jax.process_count())
      elif layout:
        logging.warning(
            "checkpoint step %d saved its data position for another pipeline (%s): the model "
            "and optimizer resume, the data stream restarts from its seed.", step, "; ".join(layout))
      else:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return from_tree(abstract_state, restored["state"]), step

  def _check_fits(self, step: int, target: dict, changed: list[str]) -> None:
    """Refuses (naming arrays and config fields) a checkpoint whose arrays do
    not match this run's model and optimizer; warns about the config fields
    that `changed` (config_differences entries) names."""
    stored = {name: (tuple(m.shape), str(m.dtype))
              for name, m in flatten(self.manager.item_metadata(step)["state"]).items()}
    wanted = {name: (tuple(x.shape), str(x.dtype)) for name, x in flatten(target).items()}
    problems = [f"{n}: checkpoint {stored[n][1]}{list(stored[n][0])}, this run {wanted[n][1]}"
                f"{list(wanted[n][0])}" for n in sorted(set(stored) & set(wanted)) if stored[n] != wanted[n]]
    problems += [f"{n} only in the checkpoint" for n in sorted(set(stored) - set(wanted))]
    problems += [f"{n} only in this run" for n in sorted(set(wanted) - set(stored))]
    if problems:  # a --workdir of another config: one line from the commands, no traceback
      raise BadArgument(
          f"checkpoint step {step} in {self.directory} does not fit this run's model "
          f"({len(problems)} arrays differ, e.g. {'; '.join(problems[:3])}). Config fields that "
          f"differ: {'; '.join(changed) or 'none'}. Use the checkpoint's settings or a new --workdir.")
    if changed:
      logging.warning("resuming step %d with config changes: %s", step, "; ".join(changed))

  def restore_params(self, abstract_params: dict, step: int | None = None) -> dict:
    """Only the model parameters named in `abstract_params` (a pure dict of
    ShapeDtypeStructs shaped like {"model": {...}}), nothing else: orbax's
    partial restore reads just those arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_params, restore_args=restore_args, partial_restore=True)))
    return restored["state"]

  def read_json(self, step: int, item: str) -> dict:
    """The `meta` or `config` item of `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def saved_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return config_from_json(self.read_json(step, "config"))


# =============================================================================
# Preemption: SIGTERM -> save at the next step boundary and stop
# =============================================================================
class PreemptionWatch:
  """`with PreemptionWatch() as watch: ... if watch.reached(step, ckpt): ...`

  One process: a SIGTERM handler sets a flag the loop reads after each step;
  a second SIGTERM before the step ends stops the process at once (exit
  status 143) without SIGKILL: a run stuck inside a step still closes its
  checkpoint manager, so a save already under way finishes.
  Several processes: JAX's preemption sync point (orbax `reached_preemption`),
  which makes every host stop at the same step; a per-host flag could not.
  """

  def __init__(self):
    self.requested = threading.Event()
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    if self.requested.is_set():  # the run never reached a step boundary (stuck reading data?)
      logging.warning("received signal %d again: stopping now, without a checkpoint of this step",
                      signum)
      raise SystemExit(128 + signum)
    logging.warning("received signal %d: saving a checkpoint at the next step boundary (a second "
                    "one stops at once)", signum)
    self.requested.set()

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        logging.warning("PreemptionWatch: not in the main thread, SIGTERM is not intercepted")
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def reached(self, step: int, ckpt: Checkpointer) -> bool:
    if jax.process_count() > 1:
      return ckpt.manager.reached_preemption(step)
    return self.requested.is_set()
