"""Converts image–text data to ArrayRecord shards of one record schema.

  python -m ito_jax.data.convert --kind=folder --input=DIR [--captions=DIR/captions.jsonl] --output=OUT
  python -m ito_jax.data.convert --kind=tar --input='shards/*.tar' --output=OUT
  python -m ito_jax.data.convert --kind=tfds --input=coco_captions --tfds_data_dir=~/tensorflow_datasets \\
      --split=validation --output=OUT
  python -m ito_jax.data.convert --kind=tfds --input=~/tensorflow_datasets/cifar10/3.0.2 --split=test \\
      --caption_template='a photo of a {}.' --output=OUT

Inputs (readers in `ito_jax.data.convert_inputs`):
* folder: images under --input and a captions file (JSONL or CSV, default
  DIR/captions.jsonl or DIR/captions.csv). A row names its `image` (path
  relative to DIR; also `file`, `file_name`, `filename`, `path`), a `caption`
  or `captions` (or `text`), and optionally `label` (int, or a class name) and
  `id` (default: the image path). Rows of the same id add captions to it;
  its label is the first of its rows' labels that is not "no label" (below).
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

Labels: a negative integer label means no label; a label that is not an
integer, or (when the input has class names) not below their number, is a bad
record of kind `bad_label`.
Caption items that are not strings (JSON null, numbers, objects) are left
out and counted in `repaired` as `dropped_non_string_caption`.

With --validate (default) every record is decoded with the same checks
training applies (`records.parse`, captions optional for labelled records,
which evaluation can use); bad ones are counted and left out, repaired
ones (e.g. CMYK) are kept as they are and repaired again when read. Without
it records are copied as they are, and training skips and counts the bad ones.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from ito_jax import cli
from ito_jax.data import records, sources
from ito_jax.data.convert_inputs import KINDS, make_input

EXAMPLES_KEPT = 5


# ----------------------------------------------------------------- options and output
@dataclasses.dataclass(frozen=True)
class Options:
  records_per_shard: int = 10_000  # folder and tfds; a tar is one shard
  validate: bool = True
  caption_template: str = ''  # e.g. 'a photo of a {}.': captions from class names
  max_image_pixels: int = records.Limits.max_image_pixels
  max_caption_chars: int = records.Limits.max_caption_chars

  def __post_init__(self):
    for name in ('records_per_shard', 'max_image_pixels', 'max_caption_chars'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise cli.BadArgument(f'--{name}={value}: must be a positive integer')
    problem = self.caption_template and cli.template_problem(self.caption_template)
    if problem:
      raise cli.BadArgument(f'--caption_template: {problem}; e.g. \'a photo of a {{}}.\'')


def shard_name(index: int, count: int) -> str:
  return f'data-{index:05d}-of-{count:05d}.array_record'


def _write_json(path: str, value) -> None:
  """Atomic: a reader sees the old file or the whole new one."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


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
      problem = _check_label(raw, class_names)
      if problem:
        bad['bad_label'] += 1
        if len(examples['bad_label']) < EXAMPLES_KEPT:
          examples['bad_label'].append(f'{raw.id} ({problem})')
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
      repaired.update(f'dropped_{kind}' for kind in raw.dropped)  # as records' dropped captions
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


def _check_label(raw: records.RawRecord, class_names: list[str]) -> str:
  """Why `raw.label` is unusable ('' if it is fine). A negative label is the
  project's "no label" (`records.Example.label` -1) and becomes None; with
  class names, a label must index them."""
  label = raw.label
  if label is None:
    return ''
  if isinstance(label, str) and class_names:
    return f'label {label!r} is not among the class names'
  if not isinstance(label, int) or isinstance(label, bool):
    return f'label {label!r} is not an integer'
  if label < 0:
    raw.label = None
    return ''
  if class_names and label >= len(class_names):
    return f'label {label} is not below the number of class names, {len(class_names)}'
  return ''


def _run_task(args) -> dict:
  return write_shard(*args)


# ----------------------------------------------------------------- the whole conversion
def convert(kind: str, input_path: str, output: str, options: Options = Options(),
            num_workers: int = 1, progress: bool = True, **input_args) -> dict:
  """Converts and returns the manifest (also written to OUTPUT/manifest.json).

  `input_args` go to the input (folder: captions=, class_names=; tfds: split=,
  tfds_data_dir=, image_key=, caption_key=, label_key=, id_key=). Resumes a conversion of the same
  input and options found in `output`; refuses one of anything else.
  """
  if num_workers < 1:
    raise cli.BadArgument(f'--num_workers={num_workers}: must be a positive integer')
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
      raise cli.BadArgument(f'{output} holds a conversion of other input or options '
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
                    max_caption_chars=_MAX_CHARS.value)  # refuses bad counts (cli.BadArgument)
  extra = ({'captions': _CAPTIONS.value, 'class_names': class_names} if _KIND.value == 'folder' else
           {'split': _SPLIT.value,
            # bash leaves the ~ of --flag=~/dir alone; TFDS would keep it literally
            'tfds_data_dir': _TFDS_DATA_DIR.value and os.path.expanduser(_TFDS_DATA_DIR.value),
            'image_key': _IMAGE_KEY.value, 'caption_key': _CAPTION_KEY.value,
            'label_key': _LABEL_KEY.value, 'id_key': _ID_KEY.value}
           if _KIND.value == 'tfds' else {})
  m = convert(_KIND.value, os.path.expanduser(_INPUT.value), os.path.expanduser(_OUTPUT.value),
              options, num_workers=_WORKERS.value, **extra)
  print(f'{m["num_records"]} records in {m["num_shards"]} shards at {_OUTPUT.value} '
        f'({m["num_read"]} read); bad: {m["bad"] or "none"}; repaired: {m["repaired"] or "none"}')
  for kind, ids in m['bad_examples'].items():
    print(f'  {kind}: e.g. {", ".join(map(repr, ids))}')
  if not m['num_records']:  # training would refuse the empty source; say so now
    why = (f'all {m["num_read"]} records read were bad (see above)' if m['num_read'] else
           f'{_INPUT.value} holds no records')
    raise SystemExit(f'convert: wrote 0 records to {_OUTPUT.value}: {why}; '
                     'training cannot use an empty source')


if __name__ == '__main__':
  cli.run(main)
