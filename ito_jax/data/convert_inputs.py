"""Readers of the data `ito_jax.data.convert` converts: image folders with a
captions file, webdataset tars, and prepared TFDS data sets (the "Inputs"
section of that module's docstring). Each yields the same record dicts for
`convert.write_shard`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import tarfile
from typing import Iterator
import zlib

from ito_jax.data import records, sources

KINDS = ('folder', 'tar', 'tfds')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')


def string_captions(value) -> tuple[list[str], int]:
  """A caption field's value (one caption or a list of them) -> (the string
  captions, how many items were not strings). JSON null, numbers or objects
  are no caption text; they are left out and counted, not stored as 'None'."""
  items = value if isinstance(value, list) else [value]
  texts = [c for c in items if isinstance(c, str)]
  return texts, len(items) - len(texts)


def _no_label(label) -> bool:
  """None or a negative integer: the converter's "no label" (`convert._check_label`)."""
  return label is None or (isinstance(label, int) and not isinstance(label, bool) and label < 0)


class FolderInput:
  """Images in a directory with a JSONL or CSV captions file. Rows of one id
  merge: their captions add up, and the label is the first row's that is a
  label (a class name or a non-negative integer), so an unlabelled (-1) row
  does not hide a later row's class."""

  def __init__(self, root: str, captions_file: str = '', class_names=None):
    self.root = os.path.abspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'--input={root}: no such directory' if not os.path.exists(self.root)
                              else f'--input={root}: not a directory (--kind=folder reads a '
                              'directory of images and its captions file)')
    self.captions_file = captions_file or self._default_captions_file()
    rows, self.malformed = self._read_rows()
    by_id: dict[str, dict] = {}
    for row in rows:  # rows of one id (by default: one image) add up
      entry = by_id.setdefault(row['id'], {'image': row['image'], 'id': row['id'],
                                              'captions': [], 'label': row['label'],
                                              'non_string_captions': 0})
      entry['captions'] += row['captions']
      entry['non_string_captions'] += row['non_string_captions']
      if _no_label(entry['label']):  # a -1 row must not hide a later row's class
        entry['label'] = row['label']
    self.entries = list(by_id.values())
    self.num_records = len(self.entries)
    string_labels = sorted({e['label'] for e in self.entries if isinstance(e['label'], str)})
    self.class_names = list(class_names) if class_names else string_labels
    for e in self.entries:
      # A name outside class_names stays a string: the conversion counts the
      # record as bad_label (convert._check_label) and goes on.
      if isinstance(e['label'], str) and e['label'] in self.class_names:
        e['label'] = self.class_names.index(e['label'])

  def __getstate__(self):
    # Each task carries its own entries; workers need only the root.
    return {**self.__dict__, 'entries': None}

  def _default_captions_file(self) -> str:
    for name in ('captions.jsonl', 'captions.csv'):
      if os.path.exists(os.path.join(self.root, name)):
        return os.path.join(self.root, name)
    raise FileNotFoundError(f'no captions.jsonl or captions.csv in {self.root}; pass --captions')

  def _read_rows(self) -> tuple[list[dict], list[str]]:
    """Rows as {image, id, captions: [str], non_string_captions: int, label};
    malformed ones as 'file:line'."""
    rows, malformed = [], []
    # surrogateescape keeps bytes that are not UTF-8, for the record checks to judge.
    # utf-8-sig: a BOM (Excel's "CSV UTF-8") would otherwise become part of the first column's name.
    with open(self.captions_file, encoding='utf-8-sig', errors='surrogateescape', newline='') as f:
      if self.captions_file.endswith('.csv'):
        items = ((reader.line_num, row) for reader in [csv.DictReader(f)] for row in reader)
      else:
        items = ((n, line) for n, line in enumerate(f, 1) if line.strip())
      for line_no, item in items:
        try:
          row = json.loads(item) if isinstance(item, str) else item
          if not isinstance(row, dict):
            raise ValueError('not an object')
        except ValueError:
          malformed.append(f'{os.path.basename(self.captions_file)}:{line_no}')
          continue
        image = next((row[k] for k in ('image', 'file', 'file_name', 'filename', 'path')
                      if row.get(k)), None)
        caption = next((row[k] for k in ('captions', 'caption', 'text') if row.get(k) is not None), None)
        captions, non_strings = ([], 0) if caption is None else string_captions(caption)
        label = row.get('label')
        if isinstance(label, str) and label.strip().lstrip('-').isdigit():
          label = int(label)  # CSV gives strings
        rows.append({'image': image or f'<row {line_no}>',
                     'id': str(row.get('id') or image or f'row{line_no}'),
                     'captions': captions, 'non_string_captions': non_strings,
                     'label': label if label != '' else None})
    return rows, malformed

  def tasks(self, records_per_shard: int) -> list:
    n = max(1, -(-len(self.entries) // records_per_shard))
    return [self.entries[i * records_per_shard:(i + 1) * records_per_shard] for i in range(n)]

  def read(self, entries) -> Iterator[records.RawRecord]:
    for e in entries:
      path = os.path.join(self.root, e['image'])
      image = None
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          image = f.read()
      yield records.RawRecord(id=e['id'], image=image, label=e['label'],
                              captions=[records.to_bytes(c) for c in e['captions']] or None,
                              dropped=('non_string_caption',) * e['non_string_captions'])

  def describe(self) -> dict:
    return {'root': self.root, 'captions_file': os.path.abspath(self.captions_file),
            'records': len(self.entries)}


class _EndCheckingTarInfo(tarfile.TarInfo):
  """A TarInfo that notes on the TarFile why the member list ended early.

  A tar ends with a zero block. Streaming tarfile also ends the member list,
  without an error, where the data stops at or inside a header: a tar cut
  there would pass for a complete one. The note lets TarInput.read tell."""

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
      tar.cut_at_header = tarfile.ReadError(f'data ends at a member header ({e or "no bytes"}) '
                                            'instead of the end-of-archive block')
      raise


class TarInput:
  """Webdataset-style tar shards, one output shard each."""

  def __init__(self, pattern: str):
    self.tars = sorted(glob.glob(os.path.join(pattern, '*.tar*')) if os.path.isdir(pattern)
                       else glob.glob(pattern))
    if not self.tars:
      raise FileNotFoundError(f'no tar files match {pattern!r}')
    self.class_names, self.malformed, self.num_records = [], [], None

  def tasks(self, records_per_shard: int) -> list:
    del records_per_shard
    return list(self.tars)

  def read(self, tar_path: str) -> Iterator[records.RawRecord]:
    group, key, in_member, broken = {}, None, False, None
    try:
      # streaming: members in order
      with tarfile.open(tar_path, 'r|*', tarinfo=_EndCheckingTarInfo) as tar:
        for member in tar:
          if not member.isfile():
            continue
          directory, base = os.path.split(member.name)
          if base.startswith('.') or '.' not in base:
            continue
          stem, ext = base.split('.', 1)
          member_key = os.path.join(directory, stem)
          if member_key != key and group:
            yield self._record(key, group)
            group = {}
          key, in_member = member_key, True
          group[ext.lower()] = tar.extractfile(member).read()
          in_member = False
        if getattr(tar, 'cut_at_header', None) is not None:
          raise tar.cut_at_header
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      # A truncated or damaged tar (a common end of an interrupted download):
      # keep every whole member, count the rest as one corrupt record. A break
      # inside a member's data loses its sample; one after it (tarfile reads
      # the padding up to the next header) loses nothing read.
      if in_member:
        group = {}
      where = key if in_member or key is None else f'after {key}'
      broken = records.RawRecord(id=f'{os.path.basename(tar_path)}@{where}',
                                 corrupt=f'{type(e).__name__}: {e}')
    if group:
      yield self._record(key, group)
    if broken is not None:
      yield broken

  @staticmethod
  def _record(key: str, group: dict[str, bytes]) -> records.RawRecord:
    image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
    captions, label, dropped = None, None, ()
    if 'txt' in group:
      captions = [group['txt']]  # raw bytes: the record checks judge the encoding
    if 'json' in group:
      try:
        meta = json.loads(group['json'])
      except ValueError:
        meta = {}  # unreadable metadata: the record counts as missing what it held
      if isinstance(meta, dict):
        value = next((meta[k] for k in ('captions', 'caption', 'text') if meta.get(k) is not None), None)
        if value is not None and captions is None:
          texts, non_strings = string_captions(value)
          captions, dropped = [records.to_bytes(t) for t in texts], ('non_string_caption',) * non_strings
        if isinstance(meta.get('label'), int):
          label = meta['label']
    if 'cls' in group:
      text = group['cls'].decode('utf-8', 'replace').strip()
      try:
        label = int(text)
      except ValueError:
        label = text  # counted as bad_label by the conversion (convert._check_label)
    return records.RawRecord(id=key, image=image, captions=captions, label=label, dropped=dropped)

  def describe(self) -> dict:
    return {'tars': [os.path.abspath(t) for t in self.tars]}


class TfdsInput:
  """One split of a TFDS data set prepared as array_record."""

  def __init__(self, name_or_dir: str, split: str, data_dir: str | None = None, image_key: str = '',
               caption_key: str = '', label_key: str = '', id_key: str = ''):
    builder = sources.open_tfds(name_or_dir, data_dir)
    self.builder_dir = str(builder.data_dir)
    self.split = split
    self.fields = sources.TfdsFields.detect(builder.info.features, image=image_key,
                                            captions=caption_key, label=label_key, id=id_key)
    source = sources.TfdsSource(builder, split, self.fields)
    self.num_records, self.class_names, self.malformed = len(source), source.class_names, []
    self._source = None  # opened per process (workers rebuild it from builder_dir)

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def tasks(self, records_per_shard: int) -> list:
    n = max(1, -(-self.num_records // records_per_shard))
    return [(i * records_per_shard, min(self.num_records, (i + 1) * records_per_shard))
            for i in range(n)]

  def read(self, span) -> Iterator[records.RawRecord]:
    if self._source is None:
      self._source = sources.TfdsSource(sources.open_tfds(self.builder_dir), self.split, self.fields)
    for i in range(*span):
      yield self._source[i]

  def describe(self) -> dict:
    return {'builder_dir': self.builder_dir, 'split': self.split,
            'fields': dataclasses.asdict(self.fields), 'records': self.num_records}


def make_input(kind: str, input_path: str, *, captions: str = '', split: str = 'train',
               tfds_data_dir: str | None = None, class_names=None, **tfds_keys):
  if kind == 'folder':
    return FolderInput(input_path, captions, class_names)
  if kind == 'tar':
    return TarInput(input_path)
  if kind == 'tfds':
    return TfdsInput(input_path, split, tfds_data_dir, **tfds_keys)
  raise ValueError(f'--kind: unknown input kind {kind!r}; expected one of {KINDS}')
