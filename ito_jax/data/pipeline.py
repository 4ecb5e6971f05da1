"""Grain pipelines over the `ito_shapes` TFDS data source.

Training (per process):

    MapDataset.source(split)[process_index::process_count]   # disjoint shards
      .seed(s).shuffle().repeat()       # new order every epoch
      .random_map(TrainTransform)       # rng per record: f(seed, index)
      .to_iter_dataset().batch(B, drop_remainder=True)
      [.mp_prefetch(num_workers)]

Every random choice comes from grain's per-record generator, so batches are a
function of (config.seed, process_index, process_count) alone, and the
iterator's `get_state()`/`set_state()` (or orbax's grain checkpoint handlers)
resume the stream exactly.

Batches hold numpy arrays only (no strings) so they can go straight to devices:
`images` float32 [B, M, H, W, 3] in [-1, 1], `tokens` int32 [B, N, L],
`labels` int32 [B].
"""

from __future__ import annotations

from absl import flags
import grain
import ml_collections
import numpy as np

from ito_jax.data import augment, synthetic
from ito_jax.data.tokenizer import Tokenizer


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


def class_names(config: ml_collections.ConfigDict, data_dir: str | None = None) -> list[str]:
  return synthetic.class_names(builder_for(config, data_dir))


def shard(dataset: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Strided slice of the index space: disjoint across processes, covering the
  split, sizes differing by at most one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return dataset[process_index::process_count]


class TrainTransform(grain.transforms.RandomMap):
  """One decoded record -> M image views and N text views (a top-level class so
  it pickles into grain worker processes, tokenizer included)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.image_size = config.model.image.image_size
    self.context_length = config.model.text.context_length
    self.num_image_views = config.loss.num_image_views
    self.num_text_views = config.loss.num_text_views
    self.crop_scale = tuple(config.data.crop_scale)
    self.flip = config.data.flip
    self.word_dropout = config.data.word_dropout

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element['image']  # [64, 64, 3] uint8
    captions = [c.decode() for c in element['captions']]
    if self.flip and rng.random() < 0.5:  # per sample: all views, all captions
      image, captions = augment.flip_sample(image, captions)
    images = np.stack([augment.image_view(image, rng, self.image_size, self.crop_scale)
                       for _ in range(self.num_image_views)])  # [views, H, W, 3]
    texts = augment.text_views(captions, rng, self.num_text_views, self.word_dropout)
    tokens = self.tokenizer.encode_batch(texts, self.context_length)  # [views, L]
    return {'images': images, 'tokens': tokens, 'labels': np.int32(element['label'])}


def _per_process_seed(seed: int, process_index: int) -> int:
  # Distinct shuffle orders and augmentation streams per process, yet a pure
  # function of (seed, process_index).
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def train_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  process_index: int = 0, process_count: int = 1,
                  data_dir: str | None = None) -> grain.IterDataset:
  """Infinite, shuffled, augmented per-process batches (see module docstring).

  Iterate with `iter(...)`; the iterator has get_state/set_state. With
  `config.data.num_workers > 0` call `.close()` on it when done.
  """
  if 'partial' in config and config.partial.enabled:  # aligned pairs + unaligned pools
    from ito_jax.data import partial  # pylint: disable=g-import-not-at-top (partial imports this module)
    return partial.train_dataset(config, tokenizer, process_index=process_index,
                                 process_count=process_count, data_dir=data_dir)
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size {config.batch_size} is not divisible by '
                     f'process_count {process_count}')
  source = builder_for(config, data_dir).as_data_source('train')
  ds = shard(grain.MapDataset.source(source), process_index, process_count)
  ds = ds.seed(_per_process_seed(config.seed, process_index)).shuffle().repeat()
  ds = ds.random_map(TrainTransform(config, tokenizer))
  ds = ds.to_iter_dataset().batch(config.batch_size // process_count, drop_remainder=True)
  if config.data.num_workers > 0:
    # Grain's workers read absl flags; outside an absl app (tests, colab) nobody
    # parsed them, so take their defaults rather than fail in the workers.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return ds


def eval_arrays(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str,
                data_dir: str | None = None) -> dict[str, np.ndarray]:
  """A whole held-out split in memory, ordered by id, without random augmentation.

  Returns images float32 [E, H, W, 3] in [-1, 1] (full frame resized), tokens
  int32 [E, C, L] (all C captions), labels int32 [E], ids str [E].
  """
  source = builder_for(config, data_dir).as_data_source(split)
  records = sorted((source[i] for i in range(len(source))), key=lambda r: r['id'])
  size, length = config.model.image.image_size, config.model.text.context_length
  images = np.stack([augment.to_unit_range(augment.resize(r['image'], size))
                     for r in records])  # [E, H, W, 3]
  captions = [[c.decode() for c in r['captions']] for r in records]
  num_captions = {len(c) for c in captions}
  if len(num_captions) != 1:
    raise ValueError(f'{split}: examples have differing caption counts {num_captions}')
  tokens = tokenizer.encode_batch([c for cs in captions for c in cs], length)
  tokens = tokens.reshape(len(records), num_captions.pop(), length)  # [E, C, L]
  return {'images': images, 'tokens': tokens,
          'labels': np.array([r['label'] for r in records], np.int32),
          'ids': np.array([r['id'].decode() for r in records])}
