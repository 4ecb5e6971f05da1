"""Partially aligned training data (README, "Objective"; config section `partial`).

The training split is divided once, as a function of `config.data.seed`:

    aligned           round(ρ · N) samples drawn from the *seen* classes: true
                      (image, captions) pairs, for the contrastive/ITO losses.
                      On ito_shapes a sample qualifies only if no object of
                      an unseen class is drawn in it (its distractors too,
                      which a caption may also name).
    unaligned images  one half of the rest, images only.
    unaligned texts   the other half of the rest, captions only.

The two pools come from disjoint samples, so no true pair exists between them
and no pairing can leak into training. Classes in `partial.unseen_classes`
occur only in the pools (no aligned pair shows or names one on ito_shapes; a
converted source's samples are judged by their one label), which is what the
generalised zero-shot evaluation measures.

It works on the one configured training source (ito_shapes' train split, or
one converted directory in `config.data.sources`; unseen classes need labels).
Each step reads three independent streams, each sharded over processes,
shuffled every epoch and cleared of bad records like `pipeline.train_dataset`
(their bad-record counts are added up into the iterator's one total), zipped
into one batch:

    images [B, M, H, W, 3], tokens [B, N, L], labels [B]   aligned pairs
    unaligned_images [U, V, H, W, 3]                       image pool
    unaligned_tokens [U, V, L]                             text pool

V = `partial.unaligned_views`: augmented views of each pool image, and
distinct captions of each pool text. Views of one sample are true
correspondences inside a modality (never across), which R_ot's loop over
K = 2V measures can use (ito_jax/objective_ot.py).
"""

from __future__ import annotations

import dataclasses

from absl import flags
import grain
import ml_collections
import numpy as np

from ito_jax.data import augment, bad_records, pipeline, records, synthetic
from ito_jax.data.tokenizer import Tokenizer

_SPLIT_STREAM = 0x0A11  # keeps the split's random stream apart from other uses of data.seed


@dataclasses.dataclass(frozen=True)
class Split:
  """Sorted indices into the training source; pairwise disjoint."""
  aligned: np.ndarray  # [round(ρ N)]
  unaligned_images: np.ndarray  # [(N - aligned) // 2]
  unaligned_texts: np.ndarray  # [(N - aligned) // 2]


def split_indices(labels: np.ndarray, aligned_fraction: float, unseen_classes, seed: int,
                  shows_unseen: np.ndarray | None = None) -> Split:
  """Divides N training samples with these labels (see module docstring).

  shows_unseen [N] bool, optional: samples that show an unseen class besides
  their label (ito_shapes' distractors); they are never aligned either.
  With an odd remainder one sample is left out, so the pools have equal size.
  """
  labels = np.asarray(labels)
  n = len(labels)
  rng = np.random.default_rng([seed, _SPLIT_STREAM])
  eligible = ~np.isin(labels, np.asarray(unseen_classes, dtype=labels.dtype))
  if shows_unseen is not None:
    eligible &= ~np.asarray(shows_unseen, bool)
  seen = np.flatnonzero(eligible)
  num_aligned = int(round(aligned_fraction * n))
  if not 0 < num_aligned <= len(seen):
    raise ValueError(f'config.partial.aligned_fraction: {aligned_fraction} of {n} samples gives '
                     f'{num_aligned} aligned pairs; need between 1 and the {len(seen)} samples '
                     'of seen classes that show no unseen class')
  aligned = rng.choice(seen, num_aligned, replace=False)
  rest = rng.permutation(np.setdiff1d(np.arange(n), aligned))
  half = len(rest) // 2
  return Split(aligned=np.sort(aligned), unaligned_images=np.sort(rest[:half]),
               unaligned_texts=np.sort(rest[half:2 * half]))


def train_source(config: ml_collections.ConfigDict, data_dir: str | None = None):
  """The one training source partial mode divides (a pipeline source of RawRecords)."""
  configured = pipeline.train_sources(config, data_dir)
  if len(configured) != 1:
    raise ValueError(f'config.data.sources: partial mode divides one source, got {len(configured)}')
  return configured[0][0]


def train_labels_and_ids(source) -> tuple[np.ndarray, list[str]]:
  """The label of every record (-1 where it has none) and its id, in one
  pass over the source (images stay encoded)."""
  labels, ids = [], []
  for i in range(len(source)):
    record = source[i]
    labels.append(-1 if record.label is None else record.label)
    ids.append(record.id)
  return np.array(labels, np.int32), ids


def split_for(config: ml_collections.ConfigDict, source) -> Split:
  p = config.partial
  labels, ids = train_labels_and_ids(source)
  if p.unseen_classes and (labels < 0).all():
    raise ValueError(f'config.partial.unseen_classes: source {source.name!r} has no labels')
  absent = sorted(set(p.unseen_classes) - set(labels.tolist()))
  if absent and config.data.sources:  # for ito_shapes, validation bounds the ids (a small
    # training split may lack a class); a converted source's ids are checked here
    raise ValueError(f'config.partial.unseen_classes: {absent} occur in no label of source '
                     f'{source.name!r}')
  shows_unseen = None
  if not config.data.sources and p.unseen_classes:  # ito_shapes: distractors count too
    unseen = set(p.unseen_classes)
    shows_unseen = np.array([
        bool(unseen.intersection(synthetic.scene_classes(
            config.data.seed, 'train', synthetic.example_index(record_id, 'train'))[1:]))
        for record_id in ids])
  return split_indices(labels, p.aligned_fraction, tuple(p.unseen_classes), config.data.seed,
                       shows_unseen)


class Subset:
  """A random-access source restricted to `indices` (picklable for grain workers)."""

  def __init__(self, source, indices: np.ndarray):
    self.source = source
    self.name = source.name
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


class ImageTransform(grain.transforms.RandomMap):
  """RawRecord -> `partial.unaligned_views` augmented views of its image
  [V, H, W, 3] (its captions are never used), or a bad_records.Bad marker."""

  def __init__(self, config: ml_collections.ConfigDict, source: str):
    self.source = source
    self.limits = records.Limits.from_config(config.data)
    self.image_size = config.model.image.image_size
    self.crop_scale = tuple(config.data.crop_scale)
    self.flip = config.data.flip
    self.num_views = config.partial.unaligned_views

  def random_map(self, element: records.RawRecord, rng: np.random.Generator):
    try:
      if element.corrupt:
        raise records.BadRecord('corrupt_record', element.corrupt)
      image, repairs = records.decode_image(element.image, self.limits.max_image_pixels)
    except records.BadRecord as e:
      return bad_records.Bad(self.source, e.kind, element.id, e.detail)
    views = []
    for _ in range(self.num_views):  # each view flips on its own: no caption to keep true here
      flipped = np.ascontiguousarray(image[:, ::-1]) if self.flip and rng.random() < 0.5 else image
      views.append(augment.image_view(flipped, rng, self.image_size, self.crop_scale))  # [H, W, 3]
    return {'unaligned_images': np.stack(views),  # [V, H, W, 3]
            bad_records.META_KEY: (self.source, repairs)}


class TextTransform(grain.transforms.RandomMap):
  """RawRecord -> the tokens [V, L] of `partial.unaligned_views` of its
  captions (distinct while it has enough; augment.text_views), its image never
  decoded, or a bad_records.Bad marker."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, source: str):
    self.tokenizer = tokenizer
    self.source = source
    self.limits = records.Limits.from_config(config.data)
    self.context_length = config.model.text.context_length
    self.word_dropout = config.data.word_dropout
    self.num_views = config.partial.unaligned_views

  def random_map(self, element: records.RawRecord, rng: np.random.Generator):
    try:
      if element.corrupt:
        raise records.BadRecord('corrupt_record', element.corrupt)
      captions, dropped = records.decode_captions(element.captions, self.limits.max_caption_chars)
    except records.BadRecord as e:
      return bad_records.Bad(self.source, e.kind, element.id, e.detail)
    texts = augment.text_views(captions, rng, self.num_views, self.word_dropout)  # distinct captions first
    return {'unaligned_tokens': self.tokenizer.encode_batch(texts, self.context_length),  # [V, L]
            bad_records.META_KEY: (self.source, tuple(f'dropped_{k}' for k in dropped))}


class MergeBatches(grain.transforms.Map):
  """(aligned batch, image batch, token batch) -> one batch dict, with their
  bad-record counts added up under bad_records.COUNTS_KEY."""

  def map(self, element):
    counts = bad_records.DataCounts()
    merged = {}
    for part in element:
      part = dict(part)
      counts.merge(bad_records.DataCounts.from_dict(part.pop(bad_records.COUNTS_KEY)))
      merged.update(part)
    merged[bad_records.COUNTS_KEY] = counts.to_dict()
    return merged


def _stream(source, indices, transform, batch_size: int, seed: int, process_index: int,
            process_count: int, limits) -> grain.IterDataset:
  ds = pipeline.shard(grain.MapDataset.source(Subset(source, indices)), process_index, process_count)
  if len(ds) == 0:
    raise ValueError(f'process {process_index}: its shard of a {len(indices)}-sample pool is empty')
  ds = ds.seed(seed).shuffle().repeat().random_map(transform)
  return bad_records.GoodBatches(ds.to_iter_dataset(), batch_size, *limits)


def train_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  process_index: int = 0, process_count: int = 1,
                  data_dir: str | None = None) -> grain.IterDataset:
  """Infinite per-process batches of aligned pairs plus unaligned images and
  texts (module docstring); same iterator protocol as pipeline.train_dataset."""
  b, u = config.batch_size, config.partial.unaligned_batch_size
  for name, size in (('batch_size', b), ('partial.unaligned_batch_size', u)):
    if size % process_count:
      raise ValueError(f'config.{name} {size} is not divisible by process_count {process_count}')
  source = train_source(config, data_dir)
  split = split_for(config, source)
  seeds = np.random.SeedSequence([config.seed, process_index, _SPLIT_STREAM]).generate_state(3)
  limits = (config.data.max_bad_fraction, config.data.bad_check_min_records)
  where = dict(process_index=process_index, process_count=process_count, limits=limits)
  streams = [
      _stream(source, split.aligned, pipeline.TrainTransform(config, tokenizer, source.name),
              b // process_count, int(seeds[0]), **where),
      _stream(source, split.unaligned_images, ImageTransform(config, source.name),
              u // process_count, int(seeds[1]), **where),
      _stream(source, split.unaligned_texts, TextTransform(config, tokenizer, source.name),
              u // process_count, int(seeds[2]), **where),
  ]
  ds = grain.experimental.ZipIterDataset(streams).map(MergeBatches())
  if config.data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # see pipeline.train_dataset
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return bad_records.Accounting(ds, *limits)
