"""The converter: image folders (JSONL and CSV captions), webdataset tars and
TFDS array_record data sets become ArrayRecord shards of one schema; parallel,
resumable, with a manifest. Training reading them is in
test_convert_reading.py."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

import data_helpers as h
from ito_jax.data import convert, pipeline, records, sources, synthetic
from ito_jax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 12  # examples per source


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('inputs')
  return (root, *h.write_convert_inputs(root, NUM))


# ----------------------------------------------------------------- each input kind
@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_folder(inputs, tmp_path, fmt):
  root, examples, _ = inputs
  m = convert.convert('folder', str(root / fmt), str(tmp_path / 'out'),
                      convert.Options(records_per_shard=5), progress=False)
  assert m['num_records'] == NUM and m['num_shards'] == 3 and m['bad'] == {}
  assert [s['records'] for s in m['shards']] == [5, 5, 2]
  assert m['class_names'] == sorted({synthetic.CLASS_NAMES[e['label']] for e in examples})
  assert m['captions_per_record'] == {'min': 5, 'max': 5} and m['num_labelled'] == NUM
  got = h.records_by_id(str(tmp_path / 'out'))
  for i, ex in enumerate(examples):
    r = got[ex['id']]
    name = f'{ex["id"]}.{"png" if i % 2 == 0 else "jpg"}'
    assert r.image == (root / fmt / 'img' / name).read_bytes()  # bytes copied, not re-encoded
    assert [c.decode() for c in r.captions] == ex['captions']
    assert m['class_names'][r.label] == synthetic.CLASS_NAMES[ex['label']]


def test_tar_from_the_command_line(inputs, tmp_path):
  root, examples, _ = inputs
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'ito_jax.data.convert', '--kind=tar', f'--input={root / "tars"}',
       f'--output={out}', '--num_workers=1'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'{NUM} records in 2 shards' in proc.stdout
  m = json.loads((out / 'manifest.json').read_text())
  assert [s['records'] for s in m['shards']] == [7, NUM - 7]  # one shard per tar
  assert m['bad'] == {'missing_field': 1, 'non_utf8_caption': 1}
  assert m['bad_examples'] == {'missing_field': ['shard/no_caption'],
                               'non_utf8_caption': ['shard/bad_text']}
  got = h.records_by_id(str(out))
  for i, ex in enumerate(examples):
    r = got[f'shard/{ex["id"]}']
    if i % 2 == 0:  # jpg + txt: one caption, no label
      assert [c.decode() for c in r.captions] == ex['captions'][:1] and r.label is None
      assert Image.open(io.BytesIO(r.image)).format == 'JPEG'
    else:  # png + json + cls
      assert r.image == ex['image'] and r.label == ex['label']
      assert [c.decode() for c in r.captions] == ex['captions']


def test_truncated_tar_keeps_what_came_before(inputs, tmp_path):
  root, examples, _ = inputs
  whole = (root / 'tars' / 'a.tar').read_bytes()
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'cut.tar').write_bytes(whole[:len(whole) // 2])  # mid-member
  m = convert.convert('tar', str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  assert m['bad'] == {'corrupt_record': 1} and m['bad_examples']['corrupt_record'][0].startswith('cut.tar@')
  got = h.records_by_id(str(tmp_path / 'out'))
  assert 0 < len(got) < 7 and list(got) == [f'shard/{e["id"]}' for e in examples[:len(got)]]


def test_tar_cut_in_the_padding_keeps_the_sample_before(inputs, tmp_path):
  """Every member of sample 3 is whole; only the zero padding after its last
  member (and the rest of the tar) is missing."""
  root, examples, _ = inputs
  with tarfile.open(root / 'tars' / 'a.tar') as tar:
    last = tar.getmember(f'shard/{examples[3]["id"]}.cls')
  assert last.size % 512  # there is padding to cut into
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'cut.tar').write_bytes(
      (root / 'tars' / 'a.tar').read_bytes()[:last.offset_data + last.size + 10])
  m = convert.convert('tar', str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  got = h.records_by_id(str(tmp_path / 'out'))
  assert list(got) == [f'shard/{e["id"]}' for e in examples[:4]]
  assert got[f'shard/{examples[3]["id"]}'].label == examples[3]['label']
  # The break is still reported, as one corrupt record after the kept sample.
  assert m['bad'] == {'corrupt_record': 1}
  assert m['bad_examples']['corrupt_record'] == [f'cut.tar@after shard/{examples[3]["id"]}']


def test_tfds(inputs, tmp_path):
  _, _, shapes = inputs
  m = convert.convert('tfds', shapes.data_dir, str(tmp_path / 'out'), split='test', progress=False)
  assert m['num_records'] == 40 and m['class_names'] == list(synthetic.CLASS_NAMES)
  assert m['input']['fields'] == {'image': 'image', 'captions': 'captions', 'label': 'label', 'id': 'id'}
  got = h.records_by_id(str(tmp_path / 'out'))
  for i in (0, 17, 39):
    ex = synthetic.make_example(0, 'test', i)
    r = got[ex['id']]
    assert r.image == ex['image'] and r.label == ex['label']
    assert [c.decode() for c in r.captions] == ex['captions']
  with pytest.raises(ValueError, match='no image feature'):
    sources.TfdsFields.detect({})
  with pytest.raises(ValueError, match='other input or options'):  # a different split, same output
    convert.convert('tfds', shapes.data_dir, str(tmp_path / 'out'), split='validation', progress=False)


def test_tfds_fields_of_common_layouts():
  """coco_captions / imagenet2012 / cifar10 feature layouts (built here, not
  downloaded): the right image, caption, label and id features are found."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f, i64 = tfds.features, np.int64
  coco = f.FeaturesDict({
      'captions': f.Sequence({'id': f.Tensor(shape=(), dtype=i64), 'text': f.Text()}),
      'image': f.Image(), 'image/filename': f.Text(), 'image/id': f.Tensor(shape=(), dtype=i64),
      'objects': f.Sequence({'label': f.ClassLabel(num_classes=80)})})
  fields = sources.TfdsFields.detect(coco)
  assert fields == sources.TfdsFields('image', 'captions/text', '', 'image/filename')
  record = {'captions': {'id': [1, 2], 'text': [b'a dog', b'two dogs']}, 'image': b'jpeg bytes',
            'image/filename': b'0001.jpg', 'image/id': 1, 'objects': {'label': [3]}}
  assert fields.to_raw(record, 'unused') == records.RawRecord(
      id='0001.jpg', image=b'jpeg bytes', captions=[b'a dog', b'two dogs'], label=None)
  imagenet = f.FeaturesDict({'image': f.Image(), 'label': f.ClassLabel(num_classes=9),
                             'file_name': f.Text()})  # the file name is no caption
  assert sources.TfdsFields.detect(imagenet) == sources.TfdsFields('image', '', 'label', 'file_name')
  cifar = f.FeaturesDict({'id': f.Text(), 'image': f.Image(shape=(32, 32, 3)),
                          'label': f.ClassLabel(num_classes=10)})
  assert sources.TfdsFields.detect(cifar, captions='') == sources.TfdsFields('image', '', 'label', 'id')


def test_labels_without_captions_get_template_captions(tmp_path):
  """A cifar-like set: integer labels and class names, no captions."""
  os.makedirs(tmp_path / 'in')
  rows = []
  for i, ex in enumerate(h.shapes_examples(3)):
    (tmp_path / 'in' / f'{i}.png').write_bytes(ex['image'])
    rows.append(json.dumps({'image': f'{i}.png', 'label': 2 - i}) + '\n')
  (tmp_path / 'in' / 'captions.jsonl').write_text(''.join(rows))
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'out'),
                      convert.Options(caption_template='a photo of a {}.'),
                      class_names=['cat', 'dog', 'emu'], progress=False)
  assert m['bad'] == {} and m['class_names'] == ['cat', 'dog', 'emu']
  got = h.records_by_id(str(tmp_path / 'out'))
  assert {k: (r.label, r.captions) for k, r in got.items()} == {
      '0.png': (2, [b'a photo of a emu.']), '1.png': (1, [b'a photo of a dog.']),
      '2.png': (0, [b'a photo of a cat.'])}
  # Without a template they stay captionless (a zero-shot evaluation set);
  # unlabelled ones would be missing a field.
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'plain'),
                      class_names=['cat', 'dog', 'emu'], progress=False)
  assert m['num_records'] == 3 and m['bad'] == {} and m['captions_per_record']['max'] == 0
  config = h.micro_config(eval_source=str(tmp_path / 'plain'))
  tok = tokenizer_lib.train_tokenizer(['a photo of a cat'] * 3, str(tmp_path / 'tok'), 64)
  arrays = pipeline.eval_arrays(config, tok, 'ignored')
  assert arrays['tokens'].shape == (3, 0, 16) and list(arrays['labels']) == [2, 1, 0]
  (tmp_path / 'in' / 'captions.jsonl').write_text(''.join(
      json.dumps({'image': f'{i}.png'}) + '\n' for i in range(3)))
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'unlabelled'), progress=False)
  assert m['num_records'] == 0 and m['bad'] == {'missing_field': 3}


def test_negative_labels_mean_none_and_out_of_range_labels_are_bad(tmp_path):
  os.makedirs(tmp_path / 'in')
  rows = [({'label': 0}, '0.png'), ({'label': -1, 'caption': 'a red circle'}, '1.png'),
          ({'label': -1}, '2.png'), ({'label': 3}, '3.png'), ({'label': 2.5}, '4.png'),
          ({'label': True}, '5.png')]
  ex = h.shapes_examples(1)[0]
  for row, image in rows:
    (tmp_path / 'in' / image).write_bytes(ex['image'])
  (tmp_path / 'in' / 'captions.jsonl').write_text(''.join(
      json.dumps({'image': image, **row}) + '\n' for row, image in rows))
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'out'),
                      convert.Options(caption_template='a photo of a {}.'),
                      class_names=['cat', 'dog', 'emu'], progress=False)
  got = h.records_by_id(str(tmp_path / 'out'))
  assert {k: (r.label, r.captions) for k, r in got.items()} == {
      '0.png': (0, [b'a photo of a cat.']), '1.png': (None, [b'a red circle'])}
  # -1 is no label: without a caption the record has nothing to train on.
  assert m['bad'] == {'missing_field': 1, 'bad_label': 3} and m['num_labelled'] == 1
  assert m['bad_examples']['missing_field'] == ['2.png']
  assert m['bad_examples']['bad_label'] == [
      '3.png (label 3 is not below the number of class names, 3)',
      '4.png (label 2.5 is not an integer)', '5.png (label True is not an integer)']


def test_a_later_row_labels_an_image_an_earlier_row_left_unlabelled(tmp_path):
  """-1 is "no label" when rows of one image merge, as it is for a record: a
  row naming the class fills it in, in either order; the first real label stays."""
  png = h.shapes_examples(1)[0]['image']
  os.makedirs(tmp_path / 'in')
  rows = [('a.png', -1), ('a.png', 'circle'), ('b.png', 'square'), ('b.png', -1),
          ('c.png', -1), ('c.png', 'square'), ('c.png', 'circle')]
  for image in 'abc':
    (tmp_path / 'in' / f'{image}.png').write_bytes(png)
  (tmp_path / 'in' / 'captions.jsonl').write_text(''.join(
      json.dumps({'image': image, 'caption': f'row {i}', 'label': label}) + '\n'
      for i, (image, label) in enumerate(rows)))
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  got = h.records_by_id(str(tmp_path / 'out'))
  assert m['class_names'] == ['circle', 'square'] and m['num_labelled'] == 3 and m['bad'] == {}
  assert {k: r.label for k, r in got.items()} == {'a.png': 0, 'b.png': 1, 'c.png': 1}
  assert [c.decode() for c in got['a.png'].captions] == ['row 0', 'row 1']


def test_captions_that_are_not_strings_are_dropped_and_counted(tmp_path):
  png = h.shapes_examples(1)[0]['image']
  os.makedirs(tmp_path / 'in')
  (tmp_path / 'in' / 'a.png').write_bytes(png)
  (tmp_path / 'in' / 'captions.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in [
      {'image': 'a.png', 'id': 'mixed', 'captions': [None, 7, {'x': 1}, 'a red circle']},
      {'image': 'a.png', 'id': 'mixed', 'caption': 'a red disc'},
      {'image': 'a.png', 'id': 'dict', 'caption': {'text': 'a red circle'}},
      {'image': 'a.png', 'id': 'number', 'caption': 7, 'label': 0}]))
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'folder'), progress=False)
  got = h.records_by_id(str(tmp_path / 'folder'))
  assert {k: r.captions for k, r in got.items()} == {'mixed': [b'a red circle', b'a red disc'],
                                                     'number': None}
  assert m['bad'] == {'missing_field': 1}  # 'dict': no caption left, and no label
  assert m['repaired'] == {'dropped_non_string_caption': 4}  # 3 of 'mixed', 1 of 'number'
  os.makedirs(tmp_path / 'tars')
  h.write_tar(str(tmp_path / 'tars' / 'a.tar'), [
      ('k/0.png', png), ('k/0.json', json.dumps({'captions': [None, 'a red circle', 3.5]}).encode()),
      ('k/1.png', png), ('k/1.json', json.dumps({'caption': 7, 'label': 1}).encode())])
  m = convert.convert('tar', str(tmp_path / 'tars'), str(tmp_path / 'tar'), progress=False)
  got = h.records_by_id(str(tmp_path / 'tar'))
  assert {k: r.captions for k, r in got.items()} == {'k/0': [b'a red circle'], 'k/1': []}
  assert m['bad'] == {} and m['repaired'] == {'dropped_non_string_caption': 3}


def test_malformed_caption_rows_are_counted_as_read_and_bad(tmp_path):
  """A torn JSON line and a line that is a JSON list are each one row read and
  one 'malformed_row', named by file and line; the good rows still convert."""
  os.makedirs(tmp_path / 'in')
  for i, e in enumerate(h.shapes_examples(2)):
    (tmp_path / 'in' / f'{i}.png').write_bytes(e['image'])
  (tmp_path / 'in' / 'captions.jsonl').write_text(
      json.dumps({'image': '0.png', 'caption': 'a red circle'}) + '\n'
      + '{"image": "1.png", "caption": \n'  # line 2: torn JSON
      + '["not", "an", "object"]\n'  # line 3: not an object
      + json.dumps({'image': '1.png', 'caption': 'a blue square'}) + '\n')
  m = convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  assert m['num_records'] == 2 and m['num_read'] == 4
  assert m['bad'] == {'malformed_row': 2}
  assert m['bad_examples']['malformed_row'] == ['captions.jsonl:2', 'captions.jsonl:3']


def test_sample_captions_spread_over_the_source():
  """Tokenizer training samples captions evenly over the whole source
  (records 0, 33, 66, 99 of 100), not its first records."""

  class Source:

    def __len__(self):
      return 100

    def __getitem__(self, i):
      return records.RawRecord(id=str(i), image=b'', captions=[f'caption {i}'.encode()])

  assert sources.sample_captions(Source(), 4) == ['caption 0', 'caption 33', 'caption 66', 'caption 99']


def test_parallel_resume_and_refusal(inputs, tmp_path):
  root, _, _ = inputs
  out = str(tmp_path / 'out')
  options = convert.Options(records_per_shard=4)
  first = convert.convert('folder', str(root / 'jsonl'), out, options, num_workers=2, progress=False)
  serial = convert.convert('folder', str(root / 'jsonl'), str(tmp_path / 'serial'), options,
                           progress=False)
  shards = [os.path.join(out, s['file']) for s in first['shards']]
  for a, b in zip(shards, [os.path.join(tmp_path / 'serial', s['file']) for s in serial['shards']]):
    assert open(a, 'rb').read() == open(b, 'rb').read()  # the same bytes, in parallel or not
  # An interrupted run: shard 1 lost its marker, shard 2 only got a temporary file.
  os.remove(shards[1] + '.done.json')
  os.replace(shards[2], shards[2] + '.tmp')
  os.remove(shards[2] + '.done.json')
  os.remove(os.path.join(out, 'manifest.json'))
  with pytest.raises(FileNotFoundError, match='no manifest.json'):
    sources.ArrayRecordSource(out)
  kept = os.stat(shards[0]).st_mtime_ns
  again = convert.convert('folder', str(root / 'jsonl'), out, options, progress=False)
  assert again == first and os.stat(shards[0]).st_mtime_ns == kept  # only 1 and 2 rewritten
  assert not os.path.exists(shards[2] + '.tmp')
  with pytest.raises(ValueError, match='other input or options'):
    convert.convert('folder', str(root / 'jsonl'), out, convert.Options(records_per_shard=5),
                    progress=False)
