"""Converts image–text data to ArrayRecord shards of one record schema.

  python -m ito_jax.data.convert --kind=folder --input=DIR [--captions=DIR/captions.jsonl] --output=OUT
  python -m ito_jax.data.convert --kind=tar --input='shards/*.tar' --output=OUT
  python -m ito_jax.data.convert --kind=tfds --input=coco_captions --tfds_data_dir=~/tensorflow_datasets \\
      --split=validation --output=OUT
  python -m ito_jax.data.convert --kind=tfds --input=~/tensorflow_datasets/cifar10/3.0.2 --split=test \\
      --caption_template='a photo of a {}.' --output=OUT

Inputs:
* folder: images under --input and a captions file (JSONL or CSV, default
  DIR/captions.jsonl or DIR/captions.csv). A row names its `image` (path
  relative to DIR; also `file`, `file_name`, `filename`, `path`), a `caption`
  or `captions` (or `text`), and optionally `label` (int, or a class name) and
  `id` (default: the image path). Rows of the same id add captions to it.
* tar: webdataset shards. Members `KEY.EXT` group by KEY (the name up to the
  first dot of the basename): an image (jpg, jpeg, png, webp, bmp, gif, tif,
  tiff), a caption (`txt`, or `json` with caption/captions/text), a label (`cls`,
  or `label` in the json). One output shard per input tar.
* tfds: any TFDS data set prepared as array_record, by name (with
  --tfds_data_dir) or version directory. Image, caption, label and id features
  are found by type and name (override with --image_key etc.); class names come
  from the ClassLabel feature.

Output: OUT/data-SSSSS-of-NNNNN.array_record (records in `ito_jax.data.records`
format) and OUT/manifest.json (shards, record counts, bad records by kind with
example ids, repairs, class names). Shards are written in parallel processes,
each to a temporary file renamed when complete, then a `.done.json` marker; a
rerun skips shards with a marker, so an interrupted conversion resumes. The
manifest is written last, so its presence means the conversion is complete.

With --validate (default) every record is decoded with the same checks
training applies (`records.parse`, captions optional for labelled records,
which evaluation can use); bad ones are counted and left out, repaired
ones (e.g. CMYK) are kept as they are and repaired again when read. Without
it records are copied as they are, and training skips and counts the bad ones.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import json
import multiprocessing
import os
import tarfile
from typing import Iterator
import zlib

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from ito_jax.data import records, sources

KINDS = ('folder', 'tar', 'tfds')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')
EXAMPLES_KEPT = 5


# ----------------------------------------------------------------- options and output
@dataclasses.dataclass(frozen=True)
class Options:
  records_per_shard: int = 10_000  # folder and tfds; a tar is one shard
  validate: bool = True
  caption_template: str = ''  # e.g. 'a photo of a {}.': captions from class names
  max_image_pixels: int = records.Limits.max_image_pixels
  max_caption_chars: int = records.Limits.max_caption_chars


def shard_name(index: int, count: int) -> str:
  return f'data-{index:05d}-of-{count:05d}.array_record'


def _write_json(path: str, value) -> None:
  """Atomic: a reader sees the old file or the whole new one."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


# ----------------------------------------------------------------- inputs
class FolderInput:
  """Images in a directory with a JSONL or CSV captions file."""

  def __init__(self, root: str, captions_file: str = '', class_names=None):
    self.root = os.path.abspath(root)
    self.captions_file = captions_file or self._default_captions_file()
    rows, self.malformed = self._read_rows()
    by_id: dict[str, dict] = {}
    for row in rows:  # rows of one id (by default: one image) add up
      entry = by_id.setdefault(row['id'], {'image': row['image'], 'id': row['id'],
                                              'captions': [], 'label': row['label']})
      entry['captions'] += row['captions']
      if entry['label'] is None:
        entry['label'] = row['label']
    self.entries = list(by_id.values())
    self.num_records = len(self.entries)
    string_labels = sorted({e['label'] for e in self.entries if isinstance(e['label'], str)})
    self.class_names = list(class_names) if class_names else string_labels
    for e in self.entries:
      if isinstance(e['label'], str):
        if e['label'] not in self.class_names:
          raise ValueError(f'{self.captions_file}: label {e["label"]!r} of {e["image"]!r} is not '
                           f'among the class names {self.class_names}')
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
    """Rows as {image, id, captions: [str], label}; malformed ones as 'file:line'."""
    rows, malformed = [], []
    # surrogateescape keeps bytes that are not UTF-8, for the record checks to judge.
    with open(self.captions_file, encoding='utf-8', errors='surrogateescape', newline='') as f:
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
        captions = [] if caption is None else [caption] if isinstance(caption, str) else list(caption)
        label = row.get('label')
        if isinstance(label, str) and label.strip().lstrip('-').isdigit():
          label = int(label)  # CSV gives strings
        rows.append({'image': image or f'<row {line_no}>',
                     'id': str(row.get('id') or image or f'row{line_no}'),
                     'captions': [str(c) for c in captions], 'label': label if label != '' else None})
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
                              captions=[records.to_bytes(c) for c in e['captions']] or None)

  def describe(self) -> dict:
    return {'root': self.root, 'captions_file': os.path.abspath(self.captions_file),
            'records': len(self.entries)}


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
    group, key = {}, None
    try:
      with tarfile.open(tar_path, 'r|*') as tar:  # streaming: members in order
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
          key = member_key
          group[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      # A truncated or damaged tar (a common end of an interrupted download):
      # keep what came before, count the rest as one corrupt record.
      group = {}
      yield records.RawRecord(id=f'{os.path.basename(tar_path)}@{key}',
                              corrupt=f'{type(e).__name__}: {e}')
    if group:
      yield self._record(key, group)

  @staticmethod
  def _record(key: str, group: dict[str, bytes]) -> records.RawRecord:
    image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
    captions, label = None, None
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
          captions = [records.to_bytes(v if isinstance(v, str) else str(v))
                      for v in ([value] if isinstance(value, str) else value)]
        if isinstance(meta.get('label'), int):
          label = meta['label']
    if 'cls' in group:
      try:
        label = int(group['cls'].decode().strip())
      except (UnicodeDecodeError, ValueError):
        pass
    return records.RawRecord(id=key, image=image, captions=captions, label=label)

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


# ----------------------------------------------------------------- one shard
def write_shard(source, task, path: str, class_names: list[str], options: Options) -> dict:
  """Writes the records of `task` to `path` (via a temporary file) and its
  `.done.json` marker; returns the marker: counts of what was read and written."""
  limits = records.Limits(options.max_image_pixels, options.max_caption_chars)
  read, written, labelled = 0, 0, 0
  bad, repaired = collections.Counter(), collections.Counter()
  examples = collections.defaultdict(list)
  caption_counts = []
  tmp = path + '.tmp'
  writer = ArrayRecordWriter(tmp, 'group_size:1')  # fast random access for grain
  try:
    for raw in source.read(task):
      read += 1
      if raw.corrupt:  # the input itself broke off: nothing to write, with or without --validate
        bad['corrupt_record'] += 1
        if len(examples['corrupt_record']) < EXAMPLES_KEPT:
          examples['corrupt_record'].append(raw.id)
        continue
      if not raw.captions and options.caption_template and raw.label is not None and class_names:
        raw.captions = [options.caption_template.format(class_names[raw.label]).encode()]
      if options.validate:
        try:
          # A labelled record without captions stays: zero-shot evaluation needs
          # no more (training skips it as missing_field).
          example = records.parse(raw, limits, require_captions=raw.label is None)
        except records.BadRecord as e:
          bad[e.kind] += 1
          if len(examples[e.kind]) < EXAMPLES_KEPT:
            examples[e.kind].append(raw.id)
          continue
        repaired.update(example.repairs)
      writer.write(records.encode(raw))
      written += 1
      labelled += raw.label is not None
      caption_counts.append(len(raw.captions or ()))
  except Exception as e:
    e.add_note(f'while converting {str(task)[:200]} to {path}')
    raise
  finally:
    writer.close()
  os.replace(tmp, path)
  marker = {'file': os.path.basename(path), 'read': read, 'records': written, 'labelled': labelled,
            'bad': dict(bad), 'bad_examples': dict(examples), 'repaired': dict(repaired),
            'min_captions': min(caption_counts, default=0),
            'max_captions': max(caption_counts, default=0)}
  _write_json(path + '.done.json', marker)
  return marker


def _run_task(args) -> dict:
  return write_shard(*args)


# ----------------------------------------------------------------- the whole conversion
def make_input(kind: str, input_path: str, *, captions: str = '', split: str = 'train',
               tfds_data_dir: str | None = None, class_names=None, **tfds_keys):
  if kind == 'folder':
    return FolderInput(input_path, captions, class_names)
  if kind == 'tar':
    return TarInput(input_path)
  if kind == 'tfds':
    return TfdsInput(input_path, split, tfds_data_dir, **tfds_keys)
  raise ValueError(f'--kind: unknown input kind {kind!r}; expected one of {KINDS}')


def convert(kind: str, input_path: str, output: str, options: Options = Options(),
            num_workers: int = 1, progress: bool = True, **input_args) -> dict:
  """Converts and returns the manifest (also written to OUTPUT/manifest.json).

  `input_args` go to the input (folder: captions=, class_names=; tfds: split=,
  tfds_data_dir=, image_key=, caption_key=, label_key=, id_key=). Resumes a conversion of the same
  input and options found in `output`; refuses one of anything else.
  """
  source = make_input(kind, input_path, **input_args)
  tasks = source.tasks(options.records_per_shard)
  plan = {'kind': kind, 'input': source.describe(), 'options': dataclasses.asdict(options),
          'num_shards': len(tasks), 'class_names': source.class_names}
  os.makedirs(output, exist_ok=True)
  plan_path = os.path.join(output, 'plan.json')
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      previous = json.load(f)
    if previous != json.loads(json.dumps(plan)):
      raise ValueError(f'{output} holds a conversion of other input or options '
                       f'({plan_path}); use a new --output or delete it')
  else:
    _write_json(plan_path, plan)

  paths = [os.path.join(output, shard_name(i, len(tasks))) for i in range(len(tasks))]
  markers: dict[int, dict] = {}
  for i, path in enumerate(paths):
    if os.path.exists(path) and os.path.exists(path + '.done.json'):
      with open(path + '.done.json') as f:
        markers[i] = json.load(f)
  todo = [i for i in range(len(tasks)) if i not in markers]
  args = [(source, tasks[i], paths[i], source.class_names, options) for i in todo]
  known_total = source.num_records
  bar = tqdm(total=known_total or len(tasks), unit='record' if known_total else 'shard',
             initial=sum(m['read'] for m in markers.values()) if known_total else len(markers),
             desc=f'convert {kind}', disable=not progress, dynamic_ncols=True)
  workers = max(1, min(num_workers, len(todo)))
  if workers == 1:
    results = map(_run_task, args)
  else:
    # spawn: the caller may hold threads (JAX, grain) that fork would copy mid-state.
    pool = multiprocessing.get_context('spawn').Pool(workers)
    results = pool.imap_unordered(_run_task, args)
  try:
    for marker in results:
      markers[paths.index(os.path.join(output, marker['file']))] = marker
      bar.update(marker['read'] if known_total else 1)
      bar.set_postfix(written=sum(m['records'] for m in markers.values()),
                      bad=sum(sum(m['bad'].values()) for m in markers.values()))
    if workers > 1:
      pool.close()
  finally:
    bar.close()
    if workers > 1:
      pool.terminate()  # after close(): waits for nothing; on an error: stops the rest
      pool.join()

  manifest = _manifest(plan, [markers[i] for i in range(len(tasks))], source.malformed)
  _write_json(os.path.join(output, sources.MANIFEST), manifest)
  return manifest


def _manifest(plan: dict, markers: list[dict], malformed: list[str]) -> dict:
  bad, repaired = collections.Counter(), collections.Counter()
  examples = collections.defaultdict(list)
  for m in markers:
    bad.update(m['bad'])
    repaired.update(m['repaired'])
    for kind, ids in m['bad_examples'].items():
      examples[kind] += ids[:EXAMPLES_KEPT - len(examples[kind])]
  if malformed:  # rows of a captions file that do not parse: no record to write
    bad['malformed_row'] = len(malformed)
    examples['malformed_row'] = malformed[:EXAMPLES_KEPT]
  nonempty = [m for m in markers if m['records']]
  return {
      'format': sources.FORMAT,
      'kind': plan['kind'], 'input': plan['input'], 'options': plan['options'],
      'num_records': sum(m['records'] for m in markers),
      'num_read': sum(m['read'] for m in markers) + len(malformed),
      'num_labelled': sum(m['labelled'] for m in markers),
      'num_shards': len(markers),
      'shards': [{'file': m['file'], 'records': m['records']} for m in markers],
      'bad': dict(bad), 'bad_examples': dict(examples), 'repaired': dict(repaired),
      'captions_per_record': {'min': min((m['min_captions'] for m in nonempty), default=0),
                              'max': max((m['max_captions'] for m in nonempty), default=0)},
      'class_names': plan['class_names'],
  }


# ----------------------------------------------------------------- command line
_KIND = flags.DEFINE_enum('kind', None, KINDS, 'Input kind.')
_INPUT = flags.DEFINE_string('input', None, 'Folder, tar glob/folder, or TFDS name/version dir.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory for shards and manifest.json.')
_CAPTIONS = flags.DEFINE_string('captions', '', 'folder: captions JSONL/CSV (default DIR/captions.*).')
_CLASS_NAMES = flags.DEFINE_string('class_names', '', 'folder: file with one class name per line '
                                   '(integer labels index it; default: sorted string labels).')
_SPLIT = flags.DEFINE_string('split', 'train', 'tfds: split to convert.')
_TFDS_DATA_DIR = flags.DEFINE_string('tfds_data_dir', None, 'tfds: data_dir holding --input by name.')
_IMAGE_KEY = flags.DEFINE_string('image_key', '', 'tfds: image feature (default: found by type).')
_CAPTION_KEY = flags.DEFINE_string('caption_key', '', "tfds: caption feature, e.g. 'captions/text'.")
_LABEL_KEY = flags.DEFINE_string('label_key', '', 'tfds: label feature (default: the ClassLabel).')
_ID_KEY = flags.DEFINE_string('id_key', '', 'tfds: id feature (default: id/filename if any).')
_RECORDS_PER_SHARD = flags.DEFINE_integer('records_per_shard', Options.records_per_shard,
                                          'folder/tfds: records per output shard.')
_WORKERS = flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Processes writing shards.')
_VALIDATE = flags.DEFINE_bool('validate', True, 'Decode and check every record; leave bad ones out.')
_TEMPLATE = flags.DEFINE_string('caption_template', '', "Captions for uncaptioned labelled records, "
                                "e.g. 'a photo of a {}.'")
_MAX_PIXELS = flags.DEFINE_integer('max_image_pixels', Options.max_image_pixels, 'With --validate.')
_MAX_CHARS = flags.DEFINE_integer('max_caption_chars', Options.max_caption_chars, 'With --validate.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  for flag in (_KIND, _INPUT, _OUTPUT):
    if flag.value is None:
      raise app.UsageError(f'--{flag.name} is required')
  class_names = None
  if _CLASS_NAMES.value:
    with open(_CLASS_NAMES.value) as f:
      class_names = [line.strip() for line in f if line.strip()]
  options = Options(records_per_shard=_RECORDS_PER_SHARD.value, validate=_VALIDATE.value,
                    caption_template=_TEMPLATE.value, max_image_pixels=_MAX_PIXELS.value,
                    max_caption_chars=_MAX_CHARS.value)
  extra = ({'captions': _CAPTIONS.value, 'class_names': class_names} if _KIND.value == 'folder' else
           {'split': _SPLIT.value, 'tfds_data_dir': _TFDS_DATA_DIR.value, 'image_key': _IMAGE_KEY.value,
            'caption_key': _CAPTION_KEY.value, 'label_key': _LABEL_KEY.value, 'id_key': _ID_KEY.value}
           if _KIND.value == 'tfds' else {})
  m = convert(_KIND.value, os.path.expanduser(_INPUT.value), os.path.expanduser(_OUTPUT.value),
              options, num_workers=_WORKERS.value, **extra)
  print(f'{m["num_records"]} records in {m["num_shards"]} shards at {_OUTPUT.value} '
        f'({m["num_read"]} read); bad: {m["bad"] or "none"}; repaired: {m["repaired"] or "none"}')
  for kind, ids in m['bad_examples'].items():
    print(f'  {kind}: e.g. {", ".join(map(repr, ids))}')


if __name__ == '__main__':
  app.run(main)
