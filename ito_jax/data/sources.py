"""Random-access sources of `RawRecord`s: converted ArrayRecord directories and
TFDS data sets prepared as `array_record`.

Both hand out records with the image still encoded, so decoding, repair and
the bad-record checks (`records.parse`) run in one place, inside the grain
workers, whatever the source.

A converted directory (written by `python -m ito_jax.data.convert`) holds
`manifest.json` and the shards it lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import numpy as np

from ito_jax.cli import UserError
from ito_jax.data import records

MANIFEST = 'manifest.json'
FORMAT = 'ito_jax.records/1'
# What array_record raises for a shard it cannot read (a truncated or
# overwritten file: "Corrupted Riegeli/records file", "should be at least
# 64KB big"), without naming the file.
_SHARD_ERRORS = (RuntimeError, ValueError, OSError)


class UnreadableSource(UserError, ValueError):
  """A converted directory whose manifest or a shard cannot be read: the
  message names the file and how to make it again."""


def _reconvert(path: str) -> str:
  return (f'convert the data into {path} again (`python -m ito_jax.data.convert ... '
          f'--output={path}` into an empty directory)')


# ----------------------------------------------------------------- converted dirs
class ArrayRecordSource:
  """Records of a converted directory, by global index over its shards.
  Picklable (grain ships it to worker processes; the shard readers reopen)."""

  def __init__(self, path: str):
    self.path = path
    self.manifest = read_manifest(path)
    self._files = [os.path.join(path, s['file']) for s in self.manifest['shards'] if s['records']]
    self._data = _open_shards(path, self._files) if self._files else []

  @property
  def name(self) -> str:
    return self.path

  @property
  def class_names(self) -> list[str]:
    return list(self.manifest.get('class_names') or [])

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> records.RawRecord:
    if not 0 <= index < len(self):  # a caller's mistake, not damage to the source
      raise IndexError(f'record {index} of {self.path}, which holds {len(self)}')
    try:
      data = self._data[index]
    except _SHARD_ERRORS as e:  # a shard damaged after its header
      raise UnreadableSource(f'{self.path}: record {index} cannot be read '
                             f'({type(e).__name__}: {e}); {_reconvert(self.path)}') from None
    return records.decode(data, fallback_id=f'{os.path.basename(self.path)}#{index}')

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self.path!r}, {len(self)} records)'


def read_manifest(path: str) -> dict:
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(
        f'{path!r} is not a converted source: no {MANIFEST}. Write one with '
        f'`python -m ito_jax.data.convert --kind=folder|tar|tfds --input=... --output={path}` '
        f'(an interrupted conversion writes the manifest when it is resumed and finishes).')
  with open(manifest_path) as f:
    try:
      manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UnreadableSource(f'{manifest_path}: not a manifest ({e}); {_reconvert(path)}') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    found = manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__
    raise UnreadableSource(f'{manifest_path}: format {found!r}, expected {FORMAT!r}')
  return manifest


def _open_shards(path: str, files: list[str]):
  """grain's reader of the shards; one that cannot be opened is named."""
  try:
    return grain.sources.ArrayRecordDataSource(files)
  except _SHARD_ERRORS as e:
    for file in files:  # which one: array_record's message does not say
      try:
        grain.sources.ArrayRecordDataSource([file])
      except _SHARD_ERRORS as one:
        raise UnreadableSource(f'{file}: a shard of {path} cannot be read '
                               f'({type(one).__name__}: {one}); {_reconvert(path)}') from None
    raise UnreadableSource(f'{path}: its shards cannot be read together '
                           f'({type(e).__name__}: {e}); {_reconvert(path)}') from None


# ----------------------------------------------------------------- TFDS
def _get(record: dict, path: str):
  """record['a']['b'] for path 'a/b'; TFDS keys may hold '/' themselves
  (coco_captions has a top-level 'image/filename'), so longer keys win."""
  parts = path.split('/')
  for i in range(len(parts), 0, -1):
    key = '/'.join(parts[:i])
    if key in record:
      return record[key] if i == len(parts) else _get(record[key], '/'.join(parts[i:]))
  raise KeyError(f'{path!r} not in record keys {sorted(record)}')


_ID_NAMES = ('id', 'image_id', 'filename', 'file_name')
_CAPTION_WORDS = ('caption', 'text', 'sentence', 'description')


@dataclasses.dataclass(frozen=True)
class TfdsFields:
  """Which features of a TFDS record are the image, captions, label and id
  (slash paths into nested features, e.g. 'captions/text'; '' for none)."""
  image: str
  captions: str = ''
  label: str = ''
  id: str = ''

  @classmethod
  def detect(cls, features, **overrides) -> 'TfdsFields':
    """Picks fields from a FeaturesDict by feature type and name; `overrides`
    (non-empty strings) win. Raises ValueError when there is no image."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    sequenced = set()
    flat = _flat_features(features, sequenced=sequenced)
    of_type = lambda t: [k for k, f in flat.items() if isinstance(f, t)]
    images = of_type(tfds.features.Image)
    texts = of_type(tfds.features.Text)
    # The record's id is one value: not a per-caption id inside a Sequence.
    ids = [k for k in texts + of_type(tfds.features.Tensor)
           if k.split('/')[-1] in _ID_NAMES and k not in sequenced]
    # Only text that is named like a caption: a stray text feature (a file name,
    # a URL) must not become one. Name it with --caption_key otherwise.
    captions = [k for word in _CAPTION_WORDS for k in texts
                if word in k and k.split('/')[-1] not in _ID_NAMES]
    labels = [k for k in of_type(tfds.features.ClassLabel) if '/' not in k]
    found = dict(image=images[0] if images else '', captions=captions[0] if captions else '',
                 label=labels[0] if labels else '', id=ids[0] if ids else '')
    found.update({k: v for k, v in overrides.items() if v})
    if not found['image']:
      raise ValueError(f'no image feature found among {sorted(flat)}; name one (--image_key)')
    return cls(**found)

  def to_raw(self, record: dict, fallback_id: str) -> records.RawRecord:
    """A TFDS record (images left encoded with SkipDecoding) -> RawRecord."""
    image = _get(record, self.image)
    captions = None
    if self.captions:
      value = _get(record, self.captions)
      captions = [value] if isinstance(value, (bytes, str)) else [bytes(c) for c in value]
    label = int(_get(record, self.label)) if self.label else None
    record_id = _get(record, self.id) if self.id else fallback_id
    if isinstance(record_id, bytes):
      record_id = record_id.decode('utf-8', 'replace')
    return records.RawRecord(id=str(record_id), image=bytes(image), captions=captions,
                             label=label)


def _flat_features(features, prefix: str = '', sequenced: set | None = None) -> dict[str, Any]:
  """{'a/b': feature} over nested FeaturesDict / Sequence(FeaturesDict).
  `sequenced`, if given, receives the keys that hold one value per element
  of a Sequence rather than one per record."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for name, feature in features.items():
    key = f'{prefix}{name}'
    is_sequence = isinstance(feature, tfds.features.Sequence)
    inner = feature.feature if is_sequence else feature
    if isinstance(inner, tfds.features.FeaturesDict):
      inside = _flat_features(inner, key + '/', sequenced)
      if is_sequence and sequenced is not None:
        sequenced.update(inside)
      out.update(inside)
    else:
      out[key] = inner
      if is_sequence and sequenced is not None:
        sequenced.add(key)
  return out


def open_tfds(name_or_dir: str, data_dir: str | None = None):
  """A prepared TFDS builder from its version directory (any data set, no code
  needed) or from `name[/config][:version]` under `data_dir`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(name_or_dir, 'dataset_info.json')):
    builder = tfds.builder_from_directory(name_or_dir)
  else:
    builder = tfds.builder(name_or_dir, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(f'TFDS data set {name_or_dir!r} is not prepared under '
                              f'{builder.data_dir!r}; prepare it first (file_format="array_record")')
  if builder.info.file_format is None or builder.info.file_format.value != 'array_record':
    raise ValueError(
        f'TFDS data set {name_or_dir!r} is stored as {builder.info.file_format}; reading without '
        f'TensorFlow needs array_record (prepare with file_format="array_record", or '
        f'`tfds build --file_format=array_record`)')
  return builder


class TfdsSource:
  """Records of one split of a prepared TFDS builder (images left encoded)."""

  def __init__(self, builder, split: str, fields: TfdsFields | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.fields = fields or TfdsFields.detect(builder.info.features)
    self.split = split
    self._name = f'{builder.name}:{split}'
    self._data = builder.as_data_source(
        split, decoders=_skip_image_decoding(builder.info.features, self.fields.image))
    label = builder.info.features[self.fields.label] if self.fields.label else None
    self.class_names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else []

  @property
  def name(self) -> str:
    return self._name

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> records.RawRecord:
    return self.fields.to_raw(self._data[index], fallback_id=f'{self.split}_{index}')

  def __repr__(self) -> str:
    return f'TfdsSource({self._name!r}, {len(self)} records)'


def _skip_image_decoding(features, image_path: str) -> dict:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders: Any = tfds.decode.SkipDecoding()
  if image_path in features:  # top level (its name may hold '/')
    return {image_path: decoders}
  for part in reversed(image_path.split('/')[1:]):
    decoders = {part: decoders}
  return {image_path.split('/')[0]: decoders}


def sample_captions(source, max_records: int) -> list[str]:
  """Usable captions of up to `max_records` records spread evenly over the
  source (tokenizer training); images are not decoded."""
  n = len(source)
  indices = np.unique(np.linspace(0, n - 1, min(n, max_records)).astype(int)) if n else []
  texts = []
  for index in indices:
    texts += records.decode_captions(source[int(index)].captions, 10**9, required=False)[0]
  return texts
