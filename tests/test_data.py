"""Data layer: synthetic TFDS set, tokenizer, augmentations, grain pipelines."""

import colorsys
import io
import os
import pickle
import re

import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest
from etils import epath

import data_helpers
from ito_jax.data import augment, pipeline, records, synthetic
from ito_jax.data import tokenizer as tokenizer_lib

NUM_TRAIN, NUM_EVAL = 300, 50


def make_config(data_dir, *, batch_size=8, m=2, n=3, context_length=16, num_workers=0, seed=0):
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.batch_size = batch_size
  c.model = ml_collections.ConfigDict()
  c.model.image = ml_collections.ConfigDict({'image_size': 32, 'eval_resize': 'squash'})
  c.model.text = ml_collections.ConfigDict({'context_length': context_length})
  c.loss = ml_collections.ConfigDict({'num_image_views': m, 'num_text_views': n})
  c.data = ml_collections.ConfigDict({
      'data_dir': data_dir, 'seed': 0, 'num_train': NUM_TRAIN, 'num_eval': NUM_EVAL,
      'num_workers': num_workers, 'crop_scale': (0.6, 1.0), 'flip': False, 'word_dropout': 0.2,
      'sources': (), 'eval_source': '', 'max_bad_fraction': 0.1, 'bad_check_min_records': 1000,
      'max_image_pixels': 50_000_000, 'max_caption_chars': 1000})
  return c


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  builder = synthetic.prepare(data_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  tok = tokenizer_lib.train_tokenizer(synthetic.train_captions(builder),
                                      os.path.join(data_dir, 'tok.model'), 512)
  return data_dir, builder, tok


def _first(text, lexicon):
  """The lexicon key whose word (any synonym/plural) occurs first in `text`."""
  best = None
  for key, words in lexicon.items():
    for w in words:
      m = re.search(rf'\b{re.escape(w)}\b', text)
      if m and (best is None or m.start() < best[0]):
        best = (m.start(), key)
  return best and best[1]


COLOURS = synthetic.COLOUR_WORDS
SHAPES = {k: [w for pair in v for w in pair] for k, v in synthetic.SHAPE_WORDS.items()}


def _class_of(text):
  return f'{_first(text, COLOURS)} {_first(text, SHAPES)}'


# ----------------------------------------------------------------- data set
def test_generation_is_deterministic_and_seeded():
  a = [synthetic.make_example(0, 'train', i) for i in range(5)]
  b = [synthetic.make_example(0, 'train', i) for i in range(5)]
  c = [synthetic.make_example(1, 'train', i) for i in range(5)]
  assert all(x['image'] == y['image'] and x['captions'] == y['captions'] for x, y in zip(a, b))
  assert all(x['image'] != y['image'] for x, y in zip(a, c))
  v = synthetic.make_example(0, 'validation', 0)
  assert v['image'] != a[0]['image'] and v['id'] == 'validation_000000'


def test_prepare_is_idempotent_and_reproducible(built, tmp_path):
  data_dir, builder, _ = built
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  again = synthetic.prepare(data_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=0)
  assert again.data_dir == builder.data_dir
  assert [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files] == mtimes
  # A smaller build elsewhere holds exactly the same first examples.
  small = synthetic.prepare(str(tmp_path), num_train=20, num_eval=5, seed=0)
  big = {r['id']: r for r in map(builder.as_data_source('train').__getitem__, range(NUM_TRAIN))}
  src = small.as_data_source('train')
  assert len(src) == 20 and len(small.as_data_source('test')) == 5
  for i in range(len(src)):
    r = src[i]
    np.testing.assert_array_equal(r['image'], big[r['id']]['image'])
    assert list(r['captions']) == list(big[r['id']]['captions'])


def test_captions_and_pixels_tell_the_truth(built):
  _, builder, _ = built
  names = synthetic.class_names(builder)
  assert len(names) == 30 and names[0] == 'red circle' and len(set(names)) == 30
  src = builder.as_data_source('train')
  labels = []
  for i in range(len(src)):
    r = src[i]
    captions = [c.decode() for c in r['captions']]
    assert len(set(captions)) == synthetic.NUM_CAPTIONS
    for c in captions:  # the first colour and shape named are the label's
      assert _class_of(c) == names[r['label']], (c, names[r['label']])
    colour = names[r['label']].split()[0]
    near = np.abs(r['image'].astype(int) - synthetic.COLOUR_RGB[colour]).max(-1) < 45
    assert near.sum() >= 40, (r['id'], colour)  # smallest object covers ~60 px
    labels.append(r['label'])
  assert len(set(labels)) >= 25  # classes are spread, not a few repeated


# ----------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_eos_padding_and_pickle(built, tmp_path):
  data_dir, builder, tok = built
  captions = synthetic.train_captions(builder)[:50]
  assert len(synthetic.train_captions(builder)) == NUM_TRAIN * synthetic.NUM_CAPTIONS
  ids = tok.encode_batch(captions, 64)
  assert ids.shape == (50, 64) and ids.dtype == np.int32
  for row, text in zip(ids, captions):
    n = int((row != tokenizer_lib.PAD_ID).sum())
    assert row[n - 1] == tokenizer_lib.EOS_ID and (row[n:] == 0).all()
    assert tokenizer_lib.EOS_ID not in row[:n - 1] and 0 not in row[:n]
    assert tok.decode(row) == text.lower()
  short = tok.encode_batch(captions[:3], 4)  # truncation keeps EOS last
  assert (short[:, -1] == tokenizer_lib.EOS_ID).all()
  np.testing.assert_array_equal(short[:, :3], ids[:3, :3])
  assert tok.encode_batch([''], 3).tolist() == [[tokenizer_lib.EOS_ID, 0, 0]]
  loaded = tokenizer_lib.Tokenizer.load(os.path.join(data_dir, 'tok.model'))
  unpickled = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(loaded.encode_batch(captions, 64), ids)
  np.testing.assert_array_equal(unpickled.encode_batch(captions, 64), ids)
  assert 30 < tok.vocab_size <= 512
  big = tokenizer_lib.train_tokenizer(captions, str(tmp_path / 'big.model'), 8192)
  assert big.vocab_size <= 8192 and big.decode(big.encode_batch(captions[:1], 64)[0]) == captions[0]


def test_interrupted_tokenizer_write_leaves_no_partial_model(tmp_path, monkeypatch):
  path = tmp_path / 'tok.model'
  good = tokenizer_lib.train_tokenizer(['a red circle on the left'] * 5, str(path), 64)
  before = path.read_bytes()

  def dies_halfway(self, data):
    with open(self, 'wb') as f:
      f.write(data[:len(data) // 2])
    raise KeyboardInterrupt('killed mid-write')

  monkeypatch.setattr(type(epath.Path(path)), 'write_bytes', dies_halfway)
  with pytest.raises(KeyboardInterrupt):
    tokenizer_lib.train_tokenizer(['two blue squares'] * 5, str(path), 64)
  with pytest.raises(KeyboardInterrupt):
    tokenizer_lib.train_tokenizer(['two blue squares'] * 5, str(tmp_path / 'new.model'), 64)
  assert path.read_bytes() == before and good.vocab_size > 3  # the old model, whole
  assert not (tmp_path / 'new.model').exists()  # nothing a later run could take for a model


# ----------------------------------------------------------------- augmentations
def test_augmentations_keep_captions_true():
  rng = np.random.default_rng(0)
  assert augment.flip_captions(['a red circle on the left', 'right side, left']) == [
      'a red circle on the right', 'left side, right']
  assert augment.flip_captions(['Left of the tree, a dog', 'A dog on the LEFT', 'Right, left-hand',
                                'the leftmost dog, bright']) == [
      'Right of the tree, a dog', 'A dog on the RIGHT', 'Left, right-hand', 'the leftmost dog, bright']
  image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  flipped, _ = augment.flip_sample(image, [])
  np.testing.assert_array_equal(flipped[:, 0], image[:, -1])
  # Brightness/contrast keep every unclipped pixel's hue.
  colour = np.array([[[200, 60, 30], [40, 90, 200], [120, 180, 60]]], np.uint8)
  out = augment.jitter_brightness_contrast(colour, rng, 0.2, 0.2)
  for a, b in zip(colour[0] / 255, out[0] / 255):
    if b.max() < 1 and b.min() > 0:
      assert abs(colorsys.rgb_to_hsv(*a)[0] - colorsys.rgb_to_hsv(*b)[0]) < 1e-3
  view = augment.image_view(image, rng, 32, (0.5, 1.0))
  assert view.shape == (32, 32, 3) and view.dtype == np.float32
  assert -1 <= view.min() and view.max() <= 1
  captions = ['one red circle, small, left side', 'a red disc on the left']
  views = augment.text_views(captions, rng, 6, 0.3)
  assert len(views) == 6 and sorted(views[:2]) == sorted(captions)
  assert all(v and set(v.replace(',', '').split()) <= set(' '.join(captions).replace(',', '').split())
             for v in views)
  assert augment.word_dropout('a b c', rng, 1.0) in ('a', 'b', 'c')


def test_unit_range_maps_0_255_onto_minus_1_1():
  """The towers are trained, evaluated and served on [-1, 1]; a [0, 1] map
  would still pass every range check."""
  assert augment.to_unit_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]
  assert augment.to_unit_range(np.array([127.5], np.float32)).tolist() == [0.0]
  np.testing.assert_allclose(augment.to_unit_range(np.array([51, 204], np.uint8)), [-0.6, 0.6],
                             atol=1e-6)


def test_random_resized_crop_draws_its_area_from_the_whole_scale_range():
  """On a horizontal ramp the output's span of grey levels gives the crop's
  width; with square crops (ratio 1) width = sqrt(area), so the widths must
  cover [sqrt(0.1), sqrt(0.5)] and not sit at one end of it."""
  ramp = np.broadcast_to((np.arange(64) * 4).astype(np.uint8)[None, :, None], (64, 64, 3)).copy()
  widths = []
  for seed in range(50):
    out = augment.random_resized_crop(ramp, np.random.default_rng(seed), 64, (0.1, 0.5), (1.0, 1.0))
    row = out[32, :, 0].astype(np.float64)
    # Output column j samples the source at x0 + (j + 1/2) w / 64, where the ramp is 4 per pixel.
    widths.append((row[-1] - row[0]) / (4 * 63))
  assert min(widths) >= np.sqrt(0.1) - 0.03 and max(widths) <= np.sqrt(0.5) + 0.03, (min(widths), max(widths))
  assert max(widths) - min(widths) > 0.25, sorted(widths)


@pytest.mark.parametrize("h,w", [(180, 320), (200, 400), (400, 200)])
def test_random_resized_crop_of_an_image_far_from_square_still_varies(h, w):
  """At crop_scale (0.7, 1) a 16:9 or 2:1 image rarely or never holds a box
  of area share >= 0.7 at an aspect within (3/4, 4/3); the crop must not then
  fall back to the whole frame, or every view of it is the same."""
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
  whole = augment.resize(image, 32)
  crops = [augment.random_resized_crop(image, np.random.default_rng(seed), 32, (0.7, 1.0))
           for seed in range(40)]
  assert not any(np.array_equal(c, whole) for c in crops)
  assert len({c.tobytes() for c in crops}) == len(crops)


def test_flip_mirrors_the_image_and_swaps_left_right_in_the_captions(built):
  """TrainTransform with data.flip: a sample flips as a whole, so a bright
  left half arrives on the right exactly when its caption says 'right'."""
  data_dir, _, tok = built
  config = make_config(data_dir, m=1, n=1, context_length=16)
  config.data.flip = True
  transform = pipeline.TrainTransform(config, tok)
  image = np.full((64, 64, 3), 20, np.uint8)
  image[:, :32] = 220  # bright left half, dark right half
  png = io.BytesIO()
  Image.fromarray(image).save(png, format='PNG')
  record = records.RawRecord('x', png.getvalue(), [b'a white square on the left'])
  sides = []
  for seed in range(16):
    out = transform.random_map(record, np.random.default_rng(seed))
    view = out['images'][0]  # [H, W, 3]; any crop of scale >= 0.6 spans the middle
    bright = 'left' if view[:, 0].mean() > view[:, -1].mean() else 'right'
    assert abs(view[:, 0].mean() - view[:, -1].mean()) > 1.0, seed  # light vs dark, in [-1, 1]
    assert tok.decode(out['tokens'][0]) == f'a white square on the {bright}', seed
    sides.append(bright)
  assert set(sides) == {'left', 'right'}  # the flip fires for some seeds, not all


def test_clause_drop_keeps_the_subject_of_a_single_caption():
  """A converted sample with one caption gets its extra text views from
  drop_clause; a view of only the distractor clause would name the wrong class."""
  caption = 'a red circle, next to a blue square, small'
  views = [v for seed in range(50)
           for v in augment.text_views([caption], np.random.default_rng(seed), 2, 0.0)[1:]]
  assert set(views) == {'a red circle, small', 'a red circle, next to a blue square'}


# ----------------------------------------------------------------- pipelines
def test_train_batches_shapes_and_views(built):
  data_dir, _, tok = built
  config = make_config(data_dir, m=2, n=3, context_length=48)
  batch = next(iter(pipeline.train_dataset(config, tok)))
  assert batch['images'].shape == (8, 2, 32, 32, 3) and batch['images'].dtype == np.float32
  assert batch['tokens'].shape == (8, 3, 48) and batch['tokens'].dtype == np.int32
  assert batch['labels'].shape == (8,) and batch['labels'].dtype == np.int32
  assert -1 <= batch['images'].min() and batch['images'].max() <= 1
  assert not np.allclose(batch['images'][:, 0], batch['images'][:, 1])  # independent views
  names = pipeline.class_names(config)
  for tokens, label in zip(batch['tokens'], batch['labels']):
    texts = [tok.decode(t) for t in tokens]
    assert len(set(texts)) == 3  # distinct captions: 5 exist
    assert all(_class_of(t) == names[label] for t in texts)
  more = next(iter(pipeline.train_dataset(make_config(data_dir, m=1, n=7), tok)))
  assert more['tokens'].shape == (8, 7, 16) and more['images'].shape == (8, 1, 32, 32, 3)


def test_process_shards_are_disjoint_and_cover(built, monkeypatch):
  """pipeline.shard splits a source, and train_dataset reads through it: over
  an epoch two processes read disjoint halves of the records, all of them."""
  data_dir, builder, tok = built
  source = grain.MapDataset.source(builder.as_data_source('train'))
  shards = [{r['id'] for r in pipeline.shard(source, p, 3)} for p in range(3)]
  assert sum(map(len, shards)) == NUM_TRAIN and len(set.union(*shards)) == NUM_TRAIN
  config = make_config(data_dir, batch_size=8, m=1, n=1)
  b0 = next(iter(pipeline.train_dataset(config, tok, process_index=0, process_count=2)))
  b1 = next(iter(pipeline.train_dataset(config, tok, process_index=1, process_count=2)))
  assert b0['images'].shape[0] == b1['images'].shape[0] == 4
  (read,) = data_helpers.ids_read_per_process(
      monkeypatch, lambda p, n: pipeline.train_dataset(config, tok, process_index=p, process_count=n),
      [pipeline.TrainTransform], batches=NUM_TRAIN // 8).values()  # each half's 150 records, 4 a batch
  assert not read[0] & read[1] and len(read[0] | read[1]) == NUM_TRAIN
  with pytest.raises(ValueError, match='batch_size'):
    pipeline.train_dataset(make_config(data_dir, batch_size=9), tok, process_count=2)


def test_iterator_is_deterministic_and_state_restores(built):
  data_dir, _, tok = built
  config = make_config(data_dir, batch_size=16, m=2, n=2)
  it = iter(pipeline.train_dataset(config, tok))
  first = next(it)
  for _ in range(20):  # 21 batches of 16 > 300: crosses an epoch boundary
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  again = iter(pipeline.train_dataset(config, tok))
  for k, v in next(again).items():
    np.testing.assert_array_equal(v, first[k])
  restored = iter(pipeline.train_dataset(config, tok))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = next(iter(pipeline.train_dataset(make_config(data_dir, batch_size=16, m=2, n=2, seed=1), tok)))
  assert not np.array_equal(other['images'], first['images'])


def test_eval_arrays(built):
  data_dir, _, tok = built
  config = make_config(data_dir, context_length=16)
  arrays = pipeline.eval_arrays(config, tok, 'validation')
  assert arrays['images'].shape == (NUM_EVAL, 32, 32, 3) and arrays['images'].dtype == np.float32
  assert arrays['tokens'].shape == (NUM_EVAL, synthetic.NUM_CAPTIONS, 16)
  assert arrays['tokens'].dtype == np.int32 and arrays['labels'].dtype == np.int32
  assert list(arrays['ids']) == sorted(set(arrays['ids'])) and arrays['ids'][0] == 'validation_000000'
  png = synthetic.make_example(0, 'validation', 0)['image']
  pixels = augment.resize(np.asarray(Image.open(io.BytesIO(png))), 32).astype(np.float32)
  # No random augmentation: the whole frame resized, 0 -> -1 and 255 -> 1.
  np.testing.assert_allclose(arrays['images'][0], pixels / 127.5 - 1, atol=1e-6)
  assert arrays['images'].min() < -0.5 and arrays['images'].max() > 0.5  # dark and light pixels both in range
  test = pipeline.eval_arrays(config, tok, 'test')
  assert test['ids'][0] == 'test_000000' and not np.array_equal(test['images'], arrays['images'])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(built):
  data_dir, _, tok = built
  in_process = next(iter(pipeline.train_dataset(make_config(data_dir, num_workers=0), tok)))
  it = iter(pipeline.train_dataset(make_config(data_dir, num_workers=1), tok))
  try:
    batch = next(it)
  finally:
    it.close()
  for k in in_process:
    np.testing.assert_array_equal(batch[k], in_process[k])
