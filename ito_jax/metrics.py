"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files in WORKDIR/tensorboard/ (`tensorboard --logdir=WORKDIR`).

Paths go through etils.epath, so WORKDIR may be local or an object store
(`gs://bucket/run`; epath reads gs:// through gcsfs). Object stores cannot
append: there the writer keeps the jsonl lines in memory and rewrites the
object on each write, and the TensorBoard file is rewritten whole when
tensorboardX flushes it (every `flush_secs` and on close).

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import io
import itertools
import json
import os

import jax
import numpy as np
import tensorboardX
from absl import logging
from etils import epath
from tensorboardX import record_writer

from ito_jax.cli import BadArgument

TENSORBOARD_DIR = "tensorboard"
# Event file names carry the second they were opened in; this keeps two opened
# within one second by one process (a writer and its resumed successor) apart.
_event_files = itertools.count()


def to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def is_remote(path) -> bool:
  """True for object-store URIs (gs://, s3://, ...), which cannot be appended to."""
  return "://" in os.fspath(path)


class _ObjectStoreEventFile:
  """An event file on an object store, written through epath: the records are
  buffered and the whole object is rewritten on every flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectStoreEventFiles:
  """tensorboardX writer factory for object-store URIs (replaces its own GCS
  writer, which needs google-cloud-storage; this one needs only epath)."""

  def open(self, path: str) -> _ObjectStoreEventFile:
    return _ObjectStoreEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


for _scheme in ("gs", "s3"):
  record_writer.register_writer_factory(_scheme, _ObjectStoreEventFiles())


class MetricsWriter:
  """MetricsWriter(workdir).write(step, {name: scalar}); close() when done.

  Scalars go to metrics.jsonl and, as TensorBoard scalars named by their key,
  to WORKDIR/tensorboard/ (tensorboard=False turns that off)."""

  def __init__(self, workdir, filename: str = "metrics.jsonl", tensorboard: bool = True,
               flush_secs: int = 30):
    self.enabled = jax.process_index() == 0
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / filename
    self._remote = is_remote(workdir)
    self._lines: list[str] | None = None  # remote only: the object's content
    self._tensorboard = tensorboard
    self._flush_secs = flush_secs
    self._summary_writer = None  # opened on the first write
    self._purge_step = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)

  def _read_lines(self) -> list[str]:
    if not self.path.exists():
      return []
    return [line + "\n" for line in self.path.read_text().splitlines() if line.strip()]

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: to_python(v) for k, v in sorted(metrics.items())}}
    line = json.dumps(record) + "\n"
    if self._remote:
      if self._lines is None:
        self._lines = self._read_lines()
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self._tensorboard:
      self._write_scalars(record)

  def _write_scalars(self, record: dict) -> None:
    if self._summary_writer is None:
      # purge_step: TensorBoard drops events at steps >= it from earlier files
      # of this run, matching truncate_after() on the jsonl.
      self._summary_writer = tensorboardX.SummaryWriter(
          os.fspath(self.workdir / TENSORBOARD_DIR), purge_step=self._purge_step,
          flush_secs=self._flush_secs, filename_suffix=f".{os.getpid()}.{next(_event_files):06d}")
    step = record["step"]
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._summary_writer.add_scalar(name, value, step)

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (a resumed run rewrites them), and has
    TensorBoard discard the old events past `step` too."""
    if not self.enabled:
      return
    self._purge_step = int(step) + 1
    if self._summary_writer is not None:  # reopen with the purge marker
      self._summary_writer.close()
      self._summary_writer = None
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        if i == len(lines) - 1 and not line.endswith("\n"):  # a kill mid-write tears the last line
          logging.warning("%s: dropping its half-written last line %r", self.path, line[:60])
          continue
        raise BadArgument(f"{self.path}: line {i + 1} is not a JSON record ({e}); it was not "
                          "written by a killed run, so it is left for you to repair") from e
      if record["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if self._remote:  # an object write replaces the object atomically
      self._lines = kept
      self.path.write_text("".join(kept))
      return
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(self.path)

  def close(self) -> None:
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_jsonl(path) -> list[dict]:
  """The records of a metrics.jsonl (local path or URI)."""
  text = epath.Path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
