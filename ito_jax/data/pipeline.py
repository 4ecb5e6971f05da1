"""Grain pipelines over image–text sources: the embedded `ito_shapes` TFDS set
(the default) or one or more converted ArrayRecord directories mixed by weight
(`config.data.sources`, written by `python -m ito_jax.data.convert`).

Training (per process):

    for each source k:
      MapDataset.source(records_k)[process_index::process_count]   # disjoint shards
        .seed(s_k).shuffle().repeat()     # new order every epoch
        .random_map(TrainTransform)       # decode + checks + augment; rng per record
    MapDataset.mix(sources, weights)      # (one source: itself)
      .to_iter_dataset()
      GoodBatches(B)                      # skips bad records, counts them per batch
      [.mp_prefetch(num_workers)]         # everything above runs in the workers
      Accounting                          # main process: totals, logs, max_bad_fraction

Every random choice comes from grain's per-record generator, so batches are a
function of (config.seed, process_index, process_count, num_workers) alone, and
the iterator's `get_state()`/`set_state()` (or orbax's grain checkpoint
handlers) resume the stream exactly, bad-record totals included. The iterator's
`data_metrics()` gives those totals (`data_metrics(iterator)` below).

Batches hold numpy arrays only (no strings) so they can go straight to devices:
`images` float32 [B, M, H, W, 3] in [-1, 1], `tokens` int32 [B, N, L],
`labels` int32 [B] (-1 where a source has no label).
"""

from __future__ import annotations

from absl import flags, logging
import grain
import ml_collections
import numpy as np

from configs.validation import ConfigError
from ito_jax.data import augment, bad_records, records, sources, synthetic
from ito_jax.data.tokenizer import PAD_ID, Tokenizer

TOKENIZER_SAMPLE = 100_000  # records per source read for tokenizer training


def builder_for(config: ml_collections.ConfigDict, data_dir: str | None = None):
  """The prepared `ito_shapes` builder this config names (built if missing).

  The data set is generated from `config.data.seed`, independent of the
  training seed, so runs that differ in seed share one data set.
  """
  data_dir = data_dir or config.data.data_dir
  if not data_dir:
    raise ValueError('config.data.data_dir is empty: resolve it (e.g. to WORKDIR/data) '
                     'before building pipelines, or pass data_dir=')
  return synthetic.prepare(data_dir, num_train=config.data.num_train,
                           num_eval=config.data.num_eval, seed=config.data.seed)


# ----------------------------------------------------------------- sources
def configured_sources(config: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """config.data.sources as [(path, weight)]: entries are 'path' (weight 1) or
  ('path', weight)."""
  out = []
  for entry in config.data.sources:
    path, weight = (entry, 1.0) if isinstance(entry, str) else tuple(entry)
    out.append((str(path), float(weight)))
  return out


def _converted(path: str, field: str) -> sources.ArrayRecordSource:
  """The converted source at `path` (named by config.`field`), refused when it
  holds no records: the run would otherwise fail later, in the tokenizer or
  the first batch, with a message naming neither the source nor why."""
  source = sources.ArrayRecordSource(path)
  if not len(source):
    m = source.manifest
    raise ConfigError(f'config.{field}: {path} holds no records ({m.get("num_read", 0)} read at '
                      f'conversion, bad: {m.get("bad") or "none"}); convert data with records '
                      'into it, or leave it out')
  return source


def train_sources(config: ml_collections.ConfigDict, data_dir: str | None = None):
  """[(source, weight)]: the configured converted sources, else ito_shapes' train split."""
  if config.data.sources:
    return [(_converted(path, 'data.sources'), weight) for path, weight in configured_sources(config)]
  return [(sources.TfdsSource(builder_for(config, data_dir), 'train'), 1.0)]


def eval_source(config: ml_collections.ConfigDict, split: str, data_dir: str | None = None):
  """config.data.eval_source when set (a converted directory; `split` is then
  unused), else `split` of ito_shapes."""
  if config.data.eval_source:
    return _converted(config.data.eval_source, 'data.eval_source')
  return sources.TfdsSource(builder_for(config, data_dir), split)


def class_names(config: ml_collections.ConfigDict, data_dir: str | None = None) -> list[str]:
  """Zero-shot class names of the evaluation source ([] when it has none)."""
  if config.data.eval_source:
    return sources.ArrayRecordSource(config.data.eval_source).class_names
  return synthetic.class_names(builder_for(config, data_dir))


def tokenizer_texts(config: ml_collections.ConfigDict, data_dir: str | None = None) -> list[str]:
  """Captions to train the tokenizer on: all of ito_shapes' train split, or a
  sample of up to TOKENIZER_SAMPLE records of each configured source."""
  if not config.data.sources:
    return synthetic.train_captions(builder_for(config, data_dir))
  return [text for source, _ in train_sources(config, data_dir)
          for text in sources.sample_captions(source, TOKENIZER_SAMPLE)]


def shard(dataset: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Strided slice of the index space: disjoint across processes, covering the
  split, sizes differing by at most one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return dataset[process_index::process_count]


# ----------------------------------------------------------------- training
class TrainTransform(grain.transforms.RandomMap):
  """One RawRecord -> M image views and N text views, or a `bad_records.Bad`
  marker when the record cannot be used (a top-level class so it pickles into
  grain worker processes, tokenizer included)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, source: str = ''):
    self.tokenizer = tokenizer
    self.source = source
    self.limits = records.Limits.from_config(config.data)
    self.image_size = config.model.image.image_size
    self.context_length = config.model.text.context_length
    self.num_image_views = config.loss.num_image_views
    self.num_text_views = config.loss.num_text_views
    self.crop_scale = tuple(config.data.crop_scale)
    self.flip = config.data.flip
    self.word_dropout = config.data.word_dropout

  def random_map(self, element: records.RawRecord, rng: np.random.Generator):
    try:
      example = records.parse(element, self.limits)
    except records.BadRecord as e:
      return bad_records.Bad(self.source, e.kind, element.id, e.detail)
    image, captions = example.image, example.captions  # [H, W, 3] uint8, [str]
    if self.flip and rng.random() < 0.5:  # per sample: all views, all captions
      image, captions = augment.flip_sample(image, captions)
    images = np.stack([augment.image_view(image, rng, self.image_size, self.crop_scale)
                       for _ in range(self.num_image_views)])  # [views, H, W, 3]
    texts = augment.text_views(captions, rng, self.num_text_views, self.word_dropout)
    tokens = self.tokenizer.encode_batch(texts, self.context_length)  # [views, L]
    return {'images': images, 'tokens': tokens, 'labels': np.int32(example.label),
            bad_records.META_KEY: (self.source, example.repairs)}


def _per_process_seed(seed: int, process_index: int, source_index: int = 0) -> int:
  # Distinct shuffle orders and augmentation streams per process and source, yet
  # a pure function of (seed, process_index, source_index).
  key = [seed, process_index] + ([source_index] if source_index else [])
  return int(np.random.SeedSequence(key).generate_state(1)[0])


def train_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  process_index: int = 0, process_count: int = 1,
                  data_dir: str | None = None) -> grain.IterDataset:
  """Infinite, shuffled, augmented per-process batches (see module docstring).

  Iterate with `iter(...)`; the iterator has get_state/set_state and
  data_metrics(). With `config.data.num_workers > 0` call `.close()` on it when done.
  """
  if 'partial' in config and config.partial.enabled:  # aligned pairs + unaligned pools
    from ito_jax.data import partial  # pylint: disable=g-import-not-at-top (partial imports this module)
    return partial.train_dataset(config, tokenizer, process_index=process_index,
                                 process_count=process_count, data_dir=data_dir)
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size {config.batch_size} is not divisible by '
                     f'process_count {process_count}')
  parts, weights = [], []
  for k, (source, weight) in enumerate(train_sources(config, data_dir)):
    if len(source) < process_count:
      raise ConfigError(f'data source {source.name!r} has {len(source)} records, fewer than '
                        f'the {process_count} processes reading it')
    ds = shard(grain.MapDataset.source(source), process_index, process_count)
    ds = ds.seed(_per_process_seed(config.seed, process_index, k)).shuffle().repeat()
    parts.append(ds.random_map(TrainTransform(config, tokenizer, source.name)))
    weights.append(weight)
  # Mixed as iterators, not as one MapDataset: MapDataset.mix interleaves the
  # sources in a fixed pattern (1:1 is A, B, A, B, ...), and grain's workers
  # each take every W-th index of it, so with 2 workers each batch came from
  # one source. Mixed per iterator, each worker slices every source and mixes
  # its own slices.
  iters = [part.to_iter_dataset() for part in parts]
  ds = iters[0] if len(iters) == 1 else grain.IterDataset.mix(iters, weights)
  limit = (config.data.max_bad_fraction, config.data.bad_check_min_records)
  ds = bad_records.GoodBatches(ds, config.batch_size // process_count, *limit)
  if config.data.num_workers > 0:
    # Grain's workers read absl flags; outside an absl app (tests, colab) nobody
    # parsed them, so take their defaults rather than fail in the workers.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return bad_records.Accounting(ds, *limit)


def data_metrics(iterator) -> dict[str, int]:
  """Bad-record totals of a train_dataset iterator as flat metrics
  (data/records_read, data/bad/total, data/bad/<kind>, data/repaired/<repair>);
  {} for any other iterator."""
  return iterator.data_metrics() if hasattr(iterator, 'data_metrics') else {}


# ----------------------------------------------------------------- evaluation
def eval_arrays(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str,
                data_dir: str | None = None) -> dict[str, np.ndarray]:
  """A whole held-out set in memory, ordered by id, without random augmentation.

  Reads config.data.eval_source when set, else `split` of ito_shapes. Bad
  records are skipped and logged (a mostly broken set is an error). Returns
  images float32 [E, H, W, 3] in [-1, 1] (full frame resized), tokens int32
  [E, C, L] (the first C captions, C the fewest any captioned example has;
  C = 0 for a set without captions; all padding on rows without captions),
  captioned bool [E] (the rows retrieval uses), labels int32 [E] (-1: none),
  ids str [E]. A labelled example without captions still counts for zero-shot.
  """
  source = eval_source(config, split, data_dir)
  limits = records.Limits.from_config(config.data)
  examples, counts = [], bad_records.DataCounts()
  for i in range(len(source)):
    raw = source[i]
    try:
      example = records.parse(raw, limits, require_captions=False)
    except records.BadRecord as e:
      counts.add_bad(bad_records.Bad(source.name, e.kind, raw.id, e.detail))
      continue
    counts.add_good(source.name, example.repairs)
    examples.append(example)
  if not examples:
    raise ConfigError(f'evaluation set {source.name!r}: none of its {len(source)} records is usable '
                      f'{counts.by_kind()}')
  if counts.num_bad():
    logging.warning('evaluation set %s: skipped %d bad records %s', source.name,
                    counts.num_bad(), counts.by_kind())
  bad_records.check_bad_fraction(counts, config.data.max_bad_fraction,
                                 min(config.data.bad_check_min_records, len(source)))
  examples.sort(key=lambda e: e.id)
  size, length = config.model.image.image_size, config.model.text.context_length
  images = np.stack([augment.to_unit_range(augment.resize(e.image, size, config.model.image.eval_resize))
                     for e in examples])  # [E, H, W, 3]
  captioned = np.array([len(e.captions) > 0 for e in examples])  # [E]
  counts = [len(e.captions) for e in examples if e.captions]
  num_captions = min(counts, default=0)
  if 0 < len(counts) < len(examples):
    logging.warning('evaluation set %s: %d of %d examples have no caption; retrieval uses the '
                    '%d that have', source.name, len(examples) - len(counts), len(examples),
                    len(counts))
  if num_captions < max(counts, default=0):
    logging.warning('evaluation set %s: examples have %d to %d captions; using the first %d',
                    source.name, num_captions, max(counts), num_captions)
  tokens = np.full((len(examples), num_captions, length), PAD_ID, np.int32)  # [E, C, L]
  if num_captions:
    tokens[captioned] = tokenizer.encode_batch(
        [c for e in examples if e.captions for c in e.captions[:num_captions]],
        length).reshape(len(counts), num_captions, length)
  return {'images': images, 'tokens': tokens, 'captioned': captioned,
          'labels': np.array([e.label for e in examples], np.int32),
          'ids': np.array([e.id for e in examples])}
