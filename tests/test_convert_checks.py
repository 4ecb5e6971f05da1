"""The converter's handling of input it cannot fully use (tests/test_convert.py
covers each input kind): tars cut at a header, labels outside the class
names or not integers, a BOM in captions.csv, per-caption ids in TFDS
features, images above PIL's own pixel limit, and an input with no records."""

import io
import os
import subprocess
import sys
import tarfile
import zlib

import numpy as np
from PIL import Image
import pytest

import data_helpers as h
from ito_jax import cli
from ito_jax.data import convert, pipeline, records, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path: str) -> dict:
  source = sources.ArrayRecordSource(path)
  return {r.id: r for r in (source[i] for i in range(len(source)))}


def test_a_tar_cut_at_a_member_header_is_reported(tmp_path):
  """Streaming tarfile ends the member list without an error where the data
  stops at a header: the members before it are kept and the cut is one
  corrupt record, as for a cut inside a member (tests/test_convert.py)."""
  examples = h.shapes_examples(7)
  h.write_tar(str(tmp_path / 'a.tar'), h.webdataset_members(examples))
  whole = (tmp_path / 'a.tar').read_bytes()
  with tarfile.open(tmp_path / 'a.tar') as tar:
    header = tar.getmember(f'shard/{examples[4]["id"]}.jpg').offset  # sample 4's first header
  (tmp_path / 'in').mkdir()
  for name, cut in (('at.tar', header), ('inside.tar', header + 100)):
    (tmp_path / 'in' / name).write_bytes(whole[:cut])
  m = convert.convert('tar', str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  assert m['bad'] == {'corrupt_record': 2}
  assert sorted(m['bad_examples']['corrupt_record']) == [
      f'at.tar@after shard/{examples[3]["id"]}', f'inside.tar@after shard/{examples[3]["id"]}']
  assert m['num_records'] == 8  # samples 0-3 of each
  assert sorted(_records(str(tmp_path / 'out'))) == [f'shard/{e["id"]}' for e in examples[:4]]


def test_label_problems_are_bad_records_not_an_abort(tmp_path):
  """A folder row naming a class outside --class_names, and a tar .cls that
  is not an integer, are bad_label records; the rest converts. A captions
  CSV saved with a BOM (Excel's "CSV UTF-8") reads like one without."""
  ex = h.shapes_examples(1)[0]
  os.makedirs(tmp_path / 'folder')
  for i in range(3):
    (tmp_path / 'folder' / f'{i}.png').write_bytes(ex['image'])
  (tmp_path / 'folder' / 'captions.csv').write_text(
      'image,caption,label\n0.png,a cat,cat\n1.png,a bird,bird\n2.png,a dog,dog\n', encoding='utf-8-sig')
  m = convert.convert('folder', str(tmp_path / 'folder'), str(tmp_path / 'out'),
                      class_names=['cat', 'dog'], progress=False)
  assert m['num_records'] == 2 and m['bad'] == {'bad_label': 1}
  assert m['bad_examples']['bad_label'] == ["1.png (label 'bird' is not among the class names)"]
  assert {k: r.label for k, r in _records(str(tmp_path / 'out')).items()} == {'0.png': 0, '2.png': 1}
  os.makedirs(tmp_path / 'tars')
  h.write_tar(str(tmp_path / 'tars' / 'a.tar'), [
      ('s/0.png', ex['image']), ('s/0.txt', b'a cat'), ('s/0.cls', b'cat'),
      ('s/1.png', ex['image']), ('s/1.txt', b'a dog'), ('s/1.cls', b'3')])
  m = convert.convert('tar', str(tmp_path / 'tars'), str(tmp_path / 'tar_out'), progress=False)
  assert m['bad'] == {'bad_label': 1} and m['bad_examples']['bad_label'] == ["s/0 (label 'cat' is not an integer)"]
  assert {k: r.label for k, r in _records(str(tmp_path / 'tar_out')).items()} == {'s/1': 3}


def test_the_record_id_is_never_a_per_caption_id():
  """coco_captions without image/filename: image/id, not the Sequence's captions/id."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  coco = f.FeaturesDict({
      'captions': f.Sequence({'id': f.Tensor(shape=(), dtype=np.int64), 'text': f.Text()}),
      'image': f.Image(), 'image/id': f.Tensor(shape=(), dtype=np.int64)})
  assert sources.TfdsFields.detect(coco) == sources.TfdsFields('image', 'captions/text', '', 'image/id')


def test_max_image_pixels_above_pils_own_limit_is_ours_to_decide(monkeypatch):
  """PIL refuses more than 2 x Image.MAX_IMAGE_PIXELS (179M) at open; with
  data.max_image_pixels set above that, an image under our limit gets past
  the size check (this header has no pixel data, so it is then truncated)."""
  # decode_image raises PIL's process-wide limit; restored after this test.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)
  header = io.BytesIO()
  Image.new('RGB', (1, 1)).save(header, format='PNG')
  png = bytearray(header.getvalue())
  png[16:24] = (14000).to_bytes(4, 'big') * 2  # IHDR width and height: 196M pixels
  png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, 'big')  # the chunk's CRC
  with pytest.raises(records.BadRecord) as small:
    records.decode_image(bytes(png), max_pixels=50_000_000)
  assert small.value.kind == 'image_too_large'
  with pytest.raises(records.BadRecord) as large:
    records.decode_image(bytes(png), max_pixels=400_000_000)
  assert large.value.kind != 'image_too_large', large.value


def test_an_empty_input_fails_the_command_and_training_refuses_it(tmp_path):
  """An empty captions.jsonl: the command exits non-zero saying it wrote no
  records, and training refuses the (complete but empty) output by its path
  instead of failing later in the tokenizer."""
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'captions.jsonl').write_text('')
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'ito_jax.data.convert', '--kind=folder', f'--input={tmp_path / "in"}',
       f'--output={out}', '--num_workers=1'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert f'convert: wrote 0 records to {out}: {tmp_path / "in"} holds no records' in proc.stderr
  config = h.micro_config(sources=(str(out),), eval_source=str(out))
  with pytest.raises(ValueError, match=rf'config.data.sources: {out} holds no records \(0 read'):
    pipeline.train_sources(config)
  with pytest.raises(ValueError, match=rf'config.data.eval_source: {out} holds no records'):
    pipeline.eval_source(config, 'test')


def test_bad_options_and_a_missing_input_directory_are_named(tmp_path):
  """records_per_shard=0 used to divide by zero when planning shards, and a
  missing --input directory was reported as a missing captions.jsonl."""
  with pytest.raises(ValueError, match='--records_per_shard=0: must be a positive integer'):
    convert.Options(records_per_shard=0)
  # A template without its '{}' gave every record the same caption, and one
  # with another field failed mid-conversion with a bare KeyError.
  with pytest.raises(cli.BadArgument, match="--caption_template: 'a photo' has no '{}' for the class name"):
    convert.Options(caption_template='a photo')
  with pytest.raises(cli.BadArgument, match=r"--caption_template: 'a \{name\}' takes one .*KeyError"):
    convert.Options(caption_template='a {name}')
  with pytest.raises(ValueError, match='--num_workers=0: must be a positive integer'):
    convert.convert('folder', str(tmp_path), str(tmp_path / 'out'), num_workers=0, progress=False)
  missing = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match=f'--input={missing}: no such directory'):
    convert.convert('folder', missing, str(tmp_path / 'out'), progress=False)
  assert not (tmp_path / 'out').exists()


def test_a_damaged_converted_source_is_named_by_its_file(tmp_path):
  """A shard cut short or overwritten, or a manifest that is not JSON: array_record
  and json raised without naming the file, so with several sources the user
  could not tell which one to convert again."""
  h.write_folder(str(tmp_path / 'in'), h.shapes_examples(12))
  out = str(tmp_path / 'out')
  manifest = convert.convert('folder', str(tmp_path / 'in'), out,
                             convert.Options(records_per_shard=4), progress=False)
  shards = [os.path.join(out, s['file']) for s in manifest['shards']]
  assert len(shards) == 3 and len(sources.ArrayRecordSource(out)) == 12
  whole = open(shards[1], 'rb').read()
  for damaged in (whole[:100], whole[:len(whole) // 2], b'\0' * len(whole)):
    with open(shards[1], 'wb') as f:
      f.write(damaged)
    with pytest.raises(sources.UnreadableSource,
                       match=f'{shards[1]}: a shard of {out} cannot be read .*convert the data into'):
      sources.ArrayRecordSource(out)
  # Damage inside the first record's chunk: the shard opens, the read fails.
  damaged = bytearray(whole)
  damaged[200:264] = b'\xaa' * 64
  with open(shards[1], 'wb') as f:
    f.write(damaged)
  source = sources.ArrayRecordSource(out)
  assert source[3].id and source[8].id  # the other shards read
  with pytest.raises(sources.UnreadableSource, match=f'{out}: record 4 cannot be read .*Corrupted'):
    source[4]
  with pytest.raises(IndexError, match=f'record 12 of {out}, which holds 12'):
    source[12]  # past the end: the caller's mistake, not a damaged source
  with open(shards[1], 'wb') as f:
    f.write(whole)
  assert len(sources.ArrayRecordSource(out)) == 12
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    f.write('{"format": "ito_jax.rec')
  with pytest.raises(sources.UnreadableSource, match=f'{out}/manifest.json: not a manifest'):
    sources.ArrayRecordSource(out)
  assert isinstance(sources.UnreadableSource('x'), cli.UserError)  # one line from the commands
