"""Bad records never stop training: each kind is recognised, skipped and
counted; repairable images convert to the right RGB; a mostly broken source is
a clear error."""

import collections
import json
import os

import grain
import numpy as np
import pytest

import data_helpers as h
from ito_jax.data import bad_records, convert, pipeline, records, sources
from ito_jax.data import tokenizer as tokenizer_lib

LIMITS = records.Limits(max_image_pixels=h.MAX_PIXELS, max_caption_chars=1000)


# ----------------------------------------------------------------- one record
def test_record_bytes_roundtrip_and_corrupt_records():
  raw = records.RawRecord(id='a/b', image=b'\x89PNG...', captions=[b'one', 'caf\udce9'], label=3)
  back = records.decode(records.encode(raw))
  assert back == records.RawRecord(id='a/b', image=b'\x89PNG...', captions=[b'one', b'caf\xe9'], label=3)
  absent = records.decode(records.encode(records.RawRecord(id='x')))
  assert absent.image is None and absent.captions is None and absent.label is None
  for garbage in (b'', b'JUNKJUNKJUNK', records.encode(raw)[:-2], records.encode(raw) + b'x'):
    got = records.decode(garbage, fallback_id='shard#7')
    assert got.corrupt and got.id == 'shard#7'
    with pytest.raises(records.BadRecord) as e:
      records.parse(got, LIMITS)
    assert e.value.kind == 'corrupt_record'
  for label in ('x', 2.7, [1], True):  # a header edited by hand, or another writer's
    head = json.dumps({'id': 'r', 'label': label, 'image': 3, 'captions': None}).encode()
    got = records.decode(b'ITOR' + len(head).to_bytes(4, 'little') + head + b'png', 'shard#8')
    assert got.corrupt == f'ValueError: label {label!r} is not an integer or null', got
    with pytest.raises(records.BadRecord, match='corrupt_record: .*label'):
      records.parse(got, LIMITS)


def test_every_bad_image_kind_is_recognised():
  for name, data in h.bad_images(np.random.default_rng(1)).items():
    with pytest.raises(records.BadRecord) as e:
      records.parse(records.RawRecord('x', data, [b'a caption']), LIMITS)
    assert e.value.kind == name.split('.')[0], (name, e.value)
  with pytest.raises(records.BadRecord, match='missing_field'):
    records.parse(records.RawRecord('x', None, [b'a caption']), LIMITS)


def test_odd_modes_convert_to_the_right_rgb():
  for repair, (data, expected) in h.odd_images(np.random.default_rng(2)).items():
    example = records.parse(records.RawRecord('x', data, [b'a caption'], label=4), LIMITS)
    assert example.repairs == (repair,)
    assert example.image.dtype == np.uint8 and example.image.shape == expected.shape
    np.testing.assert_array_equal(example.image, expected, err_msg=repair)
    assert example.label == 4


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_exif_orientation_is_applied(fmt):
  """A photo taken sideways is stored sideways with EXIF orientation 6 (or 8);
  decoded, it is upright, as a viewer shows it."""
  import io
  from PIL import Image
  upright = np.zeros((40, 60, 3), np.uint8)  # [H, W]: a wide image, red on top, blue below
  upright[:20] = (255, 0, 0)
  upright[20:] = (0, 0, 255)
  # Stored as a camera held sideways would: rotated 90 degrees clockwise, tag 8
  # tells a viewer to rotate it back (90 degrees counter-clockwise is 6).
  for tag, stored in ((8, np.rot90(upright, -1)), (6, np.rot90(upright, 1)), (1, upright)):
    exif = Image.Exif()
    exif[0x0112] = tag
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format=fmt, exif=exif.tobytes(), quality=95, subsampling=0)
    pixels, repairs = records.decode_image(buf.getvalue(), LIMITS.max_image_pixels)
    assert pixels.shape == (40, 60, 3), (tag, pixels.shape)
    assert repairs == (), tag  # a readable EXIF block is no repair
    assert np.abs(pixels.astype(int) - upright).max() < 40, tag  # JPEG's error is small
  # A truncated EXIF block: Pillow warns and reads no tags, so nothing is
  # rotated, and the record counts the repair 'corrupt_exif'.
  buf = io.BytesIO()
  Image.fromarray(upright).save(buf, format=fmt, exif=b'Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff')
  with pytest.warns(UserWarning, match='Corrupt EXIF'):
    pixels, repairs = records.decode_image(buf.getvalue(), LIMITS.max_image_pixels)
  assert pixels.shape == (40, 60, 3)
  assert repairs == ('corrupt_exif',)


def test_decoding_in_threads_leaves_the_warnings_module_as_it_was():
  """grain decodes on a pool of threads and the HTTP server on its request
  threads: decode_image must not swap process-wide warning state (filters,
  the showwarning hook), which threads entering and leaving at once would
  leave swapped. Counting corrupt EXIF is per call all the same."""
  import io
  import warnings
  from concurrent.futures import ThreadPoolExecutor
  from PIL import Image
  good, bad = io.BytesIO(), io.BytesIO()
  Image.new('RGB', (32, 32), (200, 30, 30)).save(good, format='JPEG')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    Image.new('RGB', (32, 32)).save(bad, format='JPEG', exif=b'Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff')
  filters, hook = list(warnings.filters), warnings._showwarnmsg_impl
  inputs = [bad.getvalue() if i % 2 else good.getvalue() for i in range(400)]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Pillow's own 'Corrupt EXIF' warnings
    inner_filters = list(warnings.filters)
    with ThreadPoolExecutor(16) as pool:
      repairs = list(pool.map(lambda b: records.decode_image(b, LIMITS.max_image_pixels)[1], inputs))
    assert warnings.filters == inner_filters
  assert warnings.filters == filters and warnings._showwarnmsg_impl is hook
  assert repairs == [('corrupt_exif',) if i % 2 else () for i in range(400)]


def test_an_exif_block_pillow_cannot_parse_is_a_bad_record():
  """EXIF bytes that make Pillow's parser raise (here SyntaxError, 'not a TIFF
  file': a fuzzed byte order mark) leave the orientation unknown: the record
  is counted as corrupt_image, not an uncaught parser error."""
  import io
  from PIL import Image
  broken = bytes.fromhex('4578696600004d4dd72a000000080002010f00020000000443616d00011200f8000000019b06840000000000')
  buf = io.BytesIO()
  Image.new('RGB', (8, 8)).save(buf, format='PNG', exif=broken)
  with pytest.raises(records.BadRecord, match='corrupt_image: PNG EXIF: SyntaxError: not a TIFF file'):
    records.decode_image(buf.getvalue(), LIMITS.max_image_pixels)


def test_caption_checks():
  png = h.encode(h.Image.new('RGB', (4, 4)), 'PNG')
  parse = lambda captions: records.parse(records.RawRecord('x', png, captions), LIMITS)
  for captions, kind in [([b''], 'empty_caption'), ([b' \n\t '], 'empty_caption'),
                         ([b'caf\xe9'], 'non_utf8_caption'), ([b'w' * 1001], 'overlong_caption'),
                         ([], 'missing_field'), (None, 'missing_field'),
                         ([b'\xff', b''], 'non_utf8_caption')]:  # the first failure names it
    with pytest.raises(records.BadRecord) as e:
      parse(captions)
    assert e.value.kind == kind, captions
  example = parse([b'', b'  a  red\ncircle ', b'w' * 1001, 'caf\u00e9'.encode()])
  assert example.captions == ['a red circle', 'caf\u00e9']
  assert example.repairs == ('dropped_empty_caption', 'dropped_overlong_caption')
  assert parse([b'w' * 1000]).captions == ['w' * 1000]  # the limit itself is fine
  unlabelled = records.parse(records.RawRecord('x', png, None), LIMITS, require_captions=False)
  assert unlabelled.captions == [] and unlabelled.label == -1


# ----------------------------------------------------------------- a salted source
@pytest.fixture(scope='module')
def salted(tmp_path_factory):
  """The salted folder converted twice: as is (training meets the bad records)
  and validated (the converter counts them)."""
  root = str(tmp_path_factory.mktemp('salted'))
  kinds = h.write_salted_folder(os.path.join(root, 'in'), h.shapes_examples(24))
  raw = convert.convert('folder', os.path.join(root, 'in'), os.path.join(root, 'raw'),
                        convert.Options(validate=False), progress=False)
  checked = convert.convert('folder', os.path.join(root, 'in'), os.path.join(root, 'checked'),
                            convert.Options(validate=True, max_image_pixels=h.MAX_PIXELS),
                            progress=False)
  tok = tokenizer_lib.train_tokenizer(
      [c for ex in h.shapes_examples(24) for c in ex['captions']], os.path.join(root, 'tok'), 512)
  return root, kinds, raw, checked, tok


def _expected_kinds(kinds: dict[str, str]) -> collections.Counter:
  return collections.Counter(k for k in kinds.values() if k != 'good')


def test_converter_counts_every_kind(salted):
  _, kinds, raw, checked, _ = salted
  assert raw['num_records'] == 24 + len(kinds) and raw['bad'] == {}
  assert checked['bad'] == dict(_expected_kinds(kinds))
  assert checked['num_records'] == 24 + sum(k == 'good' for k in kinds.values())
  for kind, ids in checked['bad_examples'].items():
    assert all(kinds[i] == kind for i in ids)
  assert set(checked['repaired']) == {
      'mode_grayscale', 'mode_16bit', 'mode_palette', 'mode_alpha', 'mode_cmyk', 'mode_bilevel',
      'dropped_empty_caption'}


def test_training_stream_skips_and_counts_every_bad_record(salted):
  root, kinds, raw, _, tok = salted
  source_dir = os.path.join(root, 'raw')
  config = h.micro_config(sources=(source_dir,), max_bad_fraction=0.9, bad_check_min_records=10)
  it = iter(pipeline.train_dataset(config, tok))
  for _ in range(12):  # 96 good examples: ~3 epochs of the 24 + 7 usable records
    batch = next(it)
    assert batch['images'].shape == (8, 1, 16, 16, 3) and np.isfinite(batch['images']).all()
  totals = it.totals
  # The exact records the stream read: the same shuffled, repeated index order.
  source = sources.ArrayRecordSource(source_dir)
  order = grain.MapDataset.source(source).seed(pipeline._per_process_seed(config.seed, 0)).shuffle().repeat()
  read = [order[i].id for i in range(totals.records[source_dir])]
  expected = collections.Counter(kinds[i] for i in read if kinds.get(i, 'good') != 'good')
  assert set(expected) == set(_expected_kinds(kinds))  # every kind was met
  assert totals.by_kind() == dict(expected)
  assert read[-1] not in kinds or kinds[read[-1]] == 'good'  # a batch ends on a good record
  for kind, examples in totals.examples[source_dir].items():
    assert all(kinds[record_id] == kind for record_id, _ in examples)
  metrics = pipeline.data_metrics(it)
  assert metrics['data/bad/total'] == sum(expected.values())
  assert metrics['data/records_read'] == len(read)
  assert metrics['data/repaired/mode_cmyk'] == sum(i == 'odd/mode_cmyk' for i in read)
  # The totals are part of the iterator state: a restored iterator continues them.
  state = it.get_state()
  json.dumps(state)  # checkpointable as JSON
  nxt = next(it)
  restored = iter(pipeline.train_dataset(config, tok))
  restored.set_state(state)
  again = next(restored)
  np.testing.assert_array_equal(again['images'], nxt['images'])
  assert restored.totals.to_dict() == it.totals.to_dict()


@pytest.mark.slow
def test_counts_cross_worker_processes(salted):
  """Counts travel inside the batches: a worker process gives the same
  batches and the same totals as the main process."""
  root, _, _, _, tok = salted
  totals = []
  for workers in (0, 1):
    config = h.micro_config(sources=(os.path.join(root, 'raw'),), max_bad_fraction=0.9,
                            bad_check_min_records=10, num_workers=workers)
    it = iter(pipeline.train_dataset(config, tok))
    try:
      batches = [next(it) for _ in range(6)]
    finally:
      it.close()
    totals.append((it.totals.to_dict(), batches))
  (counts0, batches0), (counts1, batches1) = totals
  assert counts0 == counts1 and sum(counts0['bad'][os.path.join(root, 'raw')].values()) > 0
  for a, b in zip(batches0, batches1):
    np.testing.assert_array_equal(a['images'], b['images'])


def test_mostly_broken_source_is_a_clear_error(salted):
  root, kinds, _, _, tok = salted
  config = h.micro_config(sources=(os.path.join(root, 'raw'),), max_bad_fraction=0.1,
                          bad_check_min_records=40)
  it = iter(pipeline.train_dataset(config, tok))
  with pytest.raises(bad_records.BadDataError) as e:
    for _ in range(20):
      next(it)
  message = str(e.value)
  assert os.path.join(root, 'raw') in message and 'max_bad_fraction=0.1' in message
  assert any(f"'{i}'" in message for i in kinds if kinds[i] != 'good')  # example ids


def test_all_bad_source_fails_inside_a_worker(tmp_path, salted):
  """A source with no good record cannot fill a batch: the worker filling it
  raises (instead of reading forever) and the error reaches the caller."""
  *_, tok = salted
  out = str(tmp_path / 'all_bad')
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(out)
  writer = ArrayRecordWriter(os.path.join(out, 'data-00000-of-00001.array_record'), 'group_size:1')
  for i in range(5):
    writer.write(records.encode(records.RawRecord(id=f'junk{i}', image=b'not an image', captions=[b'x'])))
  writer.close()
  with open(os.path.join(out, sources.MANIFEST), 'w') as f:
    json.dump({'format': sources.FORMAT, 'shards': [{'file': 'data-00000-of-00001.array_record',
                                                     'records': 5}]}, f)
  config = h.micro_config(sources=(out,), num_workers=1, bad_check_min_records=30)
  it = iter(pipeline.train_dataset(config, tok))
  try:
    with pytest.raises(Exception, match=r"not_an_image x30 \(e.g. 'junk"):
      next(it)
  finally:
    it.close()


def test_config_checks_name_the_data_field():
  from configs import common  # pylint: disable=g-import-not-at-top
  for field, value, match in [('sources', (('/d', 0.0),), r'data\.sources\[0\]'),
                              ('sources', (('/d', 1.0, 2),), r'data\.sources\[0\]'),
                              ('max_bad_fraction', 1.0, 'data.max_bad_fraction'),
                              ('max_image_pixels', 0, 'data.max_image_pixels'),
                              ('max_caption_chars', -1, 'data.max_caption_chars'),
                              ('bad_check_min_records', 0, 'data.bad_check_min_records')]:
    config = h.micro_config()
    config.data[field] = value
    with pytest.raises(common.ConfigError, match=match):
      common.validate(config)
  config = h.micro_config(sources=('/a', ('/b', 2)))
  with pytest.raises(common.ConfigError, match=r"config\.data\.eval_source: is empty while "
                     r"data\.sources is set, so held-out evaluation would run on the synthetic "
                     r"ito_shapes set"):
    common.validate(config)
  common.validate(config, evaluates=False)  # bench: no held-out evaluation
  config.data.eval_source = '/held_out'
  common.validate(config)
  assert pipeline.configured_sources(config) == [('/a', 1.0), ('/b', 2.0)]
  config = h.micro_config(sources=('/nowhere',))
  with pytest.raises(FileNotFoundError, match="'/nowhere' is not a converted source"):
    pipeline.train_sources(config)
