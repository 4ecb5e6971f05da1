"""Bad records never stop training: skip them, count them, fail only when a
source is mostly broken.

Where the counting happens, and why there:

    per-record transform (grain worker)   -> example dict, or a `Bad` marker
    GoodBatches (grain worker)            -> batches of B good examples, each
                                             carrying the counts of what was read
                                             to fill it (records, bad, repairs)
    [mp_prefetch]                         -> batches cross to the main process
    Accounting (main process)             -> strips the counts off the batch,
                                             adds them up, logs, checks the limit

Workers cannot share counters, but every batch can carry its own: the counts
travel inside the deterministic stream, so they are the same for a given seed,
process count and worker count, survive any number of workers, and the running
totals are part of the iterator state that a checkpoint saves.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from absl import logging
import grain
import numpy as np

COUNTS_KEY = '_data_counts'  # batch key the counts travel under (removed by Accounting)
META_KEY = '_meta'  # per-example (source, repairs) key (removed by GoodBatches)
EXAMPLES_KEPT = 3  # example ids kept per (source, kind)


class BadDataError(ValueError):
  """A source whose bad fraction is above config.data.max_bad_fraction."""


@dataclasses.dataclass
class Bad:
  """What a transform returns instead of an example for a skipped record."""
  source: str
  kind: str
  id: str
  detail: str = ''


class DataCounts:
  """Records read and bad records by source and kind, repairs by kind, and a few
  example (id, detail) pairs per bad kind. Plain dicts, so it pickles cheaply
  between processes and goes into JSON iterator state as is."""

  def __init__(self, records=None, bad=None, examples=None, repaired=None):
    self.records: dict[str, int] = collections.Counter(records or {})
    self.bad: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for source, kinds in (bad or {}).items():
      self.bad[source].update(kinds)
    self.examples: dict[str, dict[str, list]] = collections.defaultdict(dict)
    for source, kinds in (examples or {}).items():
      self.examples[source].update({k: [list(e) for e in v] for k, v in kinds.items()})
    self.repaired: dict[str, int] = collections.Counter(repaired or {})

  def add_good(self, source: str, repairs=()) -> None:
    self.records[source] += 1
    self.repaired.update(repairs)

  def add_bad(self, bad: Bad) -> None:
    self.records[bad.source] += 1
    self.bad[bad.source][bad.kind] += 1
    kept = self.examples[bad.source].setdefault(bad.kind, [])
    if len(kept) < EXAMPLES_KEPT:
      kept.append([bad.id, bad.detail])

  def merge(self, other: 'DataCounts') -> list[tuple[str, str, list]]:
    """Adds `other` in; returns the (source, kind, [id, detail]) examples that
    were new to this total (what the caller logs)."""
    self.records.update(other.records)
    new = []
    for source, kinds in other.bad.items():
      self.bad[source].update(kinds)
      for kind, examples in other.examples[source].items():
        kept = self.examples[source].setdefault(kind, [])
        for example in examples:
          if len(kept) < EXAMPLES_KEPT:
            kept.append(example)
            new.append((source, kind, example))
    self.repaired.update(other.repaired)
    return new

  def num_bad(self, source: str | None = None) -> int:
    sources = self.bad if source is None else [source]
    return sum(sum(self.bad[s].values()) for s in sources if s in self.bad)

  def by_kind(self) -> dict[str, int]:
    total = collections.Counter()
    for kinds in self.bad.values():
      total.update(kinds)
    return dict(total)

  def to_dict(self) -> dict:
    return {'records': dict(self.records), 'bad': {s: dict(k) for s, k in self.bad.items()},
            'examples': {s: dict(k) for s, k in self.examples.items()},
            'repaired': dict(self.repaired)}

  @classmethod
  def from_dict(cls, d: dict) -> 'DataCounts':
    return cls(d.get('records'), d.get('bad'), d.get('examples'), d.get('repaired'))

  def metrics(self) -> dict[str, int]:
    """Flat metrics for metrics.jsonl: data/records_read, data/bad/total,
    data/bad/<kind> and data/repaired/<repair> (kinds seen so far)."""
    out = {'data/records_read': sum(self.records.values()), 'data/bad/total': self.num_bad()}
    out.update({f'data/bad/{k}': v for k, v in sorted(self.by_kind().items())})
    out.update({f'data/repaired/{k}': v for k, v in sorted(self.repaired.items())})
    return out


def check_bad_fraction(counts: DataCounts, max_fraction: float, min_records: int) -> None:
  """Raises BadDataError naming the source, its kinds and example ids when more
  than `max_fraction` of a source's records (once it has `min_records`) are bad."""
  for source, n in counts.records.items():
    bad = counts.num_bad(source)
    if n < min_records or bad <= max_fraction * n:
      continue
    kinds = '; '.join(
        f'{kind} x{count} (e.g. ' + ', '.join(repr(e[0]) for e in counts.examples[source].get(kind, [])) + ')'
        for kind, count in counts.bad[source].most_common())
    raise BadDataError(
        f'data source {source!r}: {bad} of {n} records read are bad ({bad / n:.0%}), above '
        f'config.data.max_bad_fraction={max_fraction}. {kinds}. Check the source; '
        f'`python -m ito_jax.data.convert --validate` counts the same kinds in its manifest.')


# ----------------------------------------------------------------- in the workers
class GoodBatches(grain.IterDataset):
  """Batches of `batch_size` good examples (stacked like grain's batch), each
  with the DataCounts of the records read to fill it under COUNTS_KEY.

  Raises BadDataError when filling one batch reads more than `min_records`
  records of a source above the bad fraction, so a fully broken source fails
  here instead of spinning forever.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, max_fraction: float,
               min_records: int):
    super().__init__(parent)
    self._batch_size, self._max_fraction, self._min_records = batch_size, max_fraction, min_records

  def __iter__(self):
    return _GoodBatchesIterator(self._parent.__iter__(), self._batch_size, self._max_fraction,
                                self._min_records)

  def __str__(self) -> str:
    return f'GoodBatches(batch_size={self._batch_size})'


class _GoodBatchesIterator(grain.DatasetIterator):

  def __init__(self, parent, batch_size, max_fraction, min_records):
    super().__init__(parent)
    self._batch_size, self._max_fraction, self._min_records = batch_size, max_fraction, min_records

  def __next__(self) -> dict:
    good, counts = [], DataCounts()
    while len(good) < self._batch_size:
      element = next(self._parent)  # StopIteration: the remainder is dropped
      if isinstance(element, Bad):
        counts.add_bad(element)
        check_bad_fraction(counts, self._max_fraction, self._min_records)
        continue
      source, repairs = element.pop(META_KEY)
      counts.add_good(source, repairs)
      good.append(element)
    batch = {k: np.stack([e[k] for e in good]) for k in good[0]}
    batch[COUNTS_KEY] = counts.to_dict()
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


# ----------------------------------------------------------------- main process
class Accounting(grain.IterDataset):
  """Removes the counts from each batch, keeps running totals (part of the
  iterator state), logs the first examples of each bad kind, and raises
  BadDataError when a source passes the limit. The iterator's
  `data_metrics()` gives the totals as flat metrics."""

  def __init__(self, parent: grain.IterDataset, max_fraction: float, min_records: int):
    super().__init__(parent)
    self._max_fraction, self._min_records = max_fraction, min_records

  def __iter__(self):
    return _AccountingIterator(self._parent.__iter__(), self._max_fraction, self._min_records)

  def __str__(self) -> str:
    return 'Accounting'


class _AccountingIterator(grain.DatasetIterator):

  def __init__(self, parent, max_fraction, min_records):
    super().__init__(parent)
    self._max_fraction, self._min_records = max_fraction, min_records
    self.totals = DataCounts()

  def __next__(self) -> dict:
    batch = next(self._parent)
    for source, kind, (record_id, detail) in self.totals.merge(
        DataCounts.from_dict(batch.pop(COUNTS_KEY))):
      logging.warning('skipped a bad record of %s: %s, id %r (%s)', source, kind, record_id, detail)
    check_bad_fraction(self.totals, self._max_fraction, self._min_records)
    return batch

  def data_metrics(self) -> dict[str, int]:
    return self.totals.metrics()

  def get_state(self) -> dict[str, Any]:
    return {'pipeline': self._parent.get_state(), 'data_counts': self.totals.to_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['pipeline'])
    self.totals = DataCounts.from_dict(state['data_counts'])
