"""Training reads converted ArrayRecord sources: mixed by weight in every
batch with grain workers, deterministic, eval arrays and retrieval from a
converted source, and a run from every input kind and a salted source.
The conversion itself is tested in test_convert.py."""

import json
import os

import numpy as np
from PIL import Image
import pytest

import data_helpers as h
from ito_jax import train
from ito_jax.data import convert, pipeline, synthetic
from ito_jax.data import tokenizer as tokenizer_lib
from ito_jax.metrics import read_jsonl

NUM = 12  # examples per source


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('inputs')
  _, shapes = h.write_convert_inputs(root, NUM)
  out = tmp_path_factory.mktemp('converted')
  convert.convert('folder', str(root / 'jsonl'), str(out / 'folder'), progress=False)
  convert.convert('tar', str(root / 'tars'), str(out / 'tar'), progress=False)
  convert.convert('tfds', shapes.data_dir, str(out / 'tfds'), split='train', progress=False)
  convert.convert('tfds', shapes.data_dir, str(out / 'eval'), split='test', progress=False)
  kinds = h.write_salted_folder(str(out / 'salted_in'), h.shapes_examples(NUM, seed=1))
  convert.convert('folder', str(out / 'salted_in'), str(out / 'salted'),
                  convert.Options(validate=False), progress=False)
  tok = tokenizer_lib.train_tokenizer(synthetic.train_captions(shapes), str(out / 'tok'), 512)
  return out, kinds, tok


def test_every_batch_mixes_the_sources_with_grain_workers(converted):
  """With data.num_workers = 2, each batch still holds records of both equally
  weighted sources (counted by the records read to fill it), as without
  workers: grain's workers used to split a mixed MapDataset by index, which
  gave each batch one source."""
  out, _, tok = converted
  paths = [str(out / k) for k in ('folder', 'tfds')]
  config = h.micro_config(sources=((paths[0], 1.0), (paths[1], 1.0)), num_workers=2)
  it = iter(pipeline.train_dataset(config, tok))
  try:
    for _ in range(4):
      before = dict(it.totals.records)
      next(it)
      read = {p: it.totals.records.get(p, 0) - before.get(p, 0) for p in paths}
      assert all(n >= 2 for n in read.values()), read  # 8 a batch, about 4 from each
  finally:
    it.close()


def test_mix_follows_weights_and_is_deterministic(converted, monkeypatch):
  out, _, tok = converted
  paths = [str(out / k) for k in ('folder', 'tar', 'tfds')]
  config = h.micro_config(sources=((paths[0], 2.0), (paths[1], 1.0), paths[2]))
  it = iter(pipeline.train_dataset(config, tok))
  batches = [next(it) for _ in range(4)]  # 32 records, all good
  assert it.totals.records == {paths[0]: 16, paths[1]: 8, paths[2]: 8}
  again = iter(pipeline.train_dataset(config, tok))
  for b in batches:
    for k, v in next(again).items():
      np.testing.assert_array_equal(v, b[k])
  labels = np.concatenate([b['labels'] for b in batches])  # tar records with .txt: no label
  assert labels.dtype == np.int32 and (labels == -1).any() and (labels >= 0).sum() >= 24
  # Processes read disjoint halves of every source: 4 rows a batch each, and
  # no record read by both (read-ahead included).
  assert next(iter(pipeline.train_dataset(config, tok, process_index=1, process_count=2)))[
      'images'].shape[0] == 4
  (read,) = h.ids_read_per_process(
      monkeypatch, lambda p, n: pipeline.train_dataset(config, tok, process_index=p, process_count=n),
      [pipeline.TrainTransform], batches=8).values()
  assert {s for s, _ in read[0]} == {s for s, _ in read[1]} == set(paths)  # every source, both
  assert not read[0] & read[1], sorted(read[0] & read[1])[:5]


def test_eval_arrays_from_a_converted_source(converted):
  out, _, tok = converted
  config = h.micro_config(eval_source=str(out / 'eval'))
  arrays = pipeline.eval_arrays(config, tok, 'ignored')
  assert arrays['images'].shape == (40, 16, 16, 3) and arrays['tokens'].shape == (40, 5, 16)
  assert list(arrays['ids']) == sorted(arrays['ids']) and arrays['ids'][0] == 'test_000000'
  assert arrays['labels'][0] == synthetic.make_example(0, 'test', 0)['label']
  assert pipeline.class_names(config) == list(synthetic.CLASS_NAMES)
  # A tar source has 1 or 5 captions per example: the first one of each is used.
  mixed = pipeline.eval_arrays(h.micro_config(eval_source=str(out / 'tar')), tok, 'ignored')
  assert mixed['tokens'].shape == (NUM, 1, 16)
  # What an evaluation set lacks is not evaluated: the tar set has unlabelled
  # examples (no zero-shot), a labels-only set has no retrieval.
  from ito_jax.evaluate.evaluator import Evaluator  # pylint: disable=g-import-not-at-top
  tar_eval = Evaluator(config, mixed, pipeline.class_names(config), tok)
  assert tar_eval.retrieval and not tar_eval.zeroshot
  labels_only = dict(arrays, tokens=arrays['tokens'][:, :0])
  only = Evaluator(config, labels_only, synthetic.CLASS_NAMES, tok)
  assert only.zeroshot and not only.retrieval
  with pytest.raises(ValueError, match='neither'):
    Evaluator(config, labels_only, [], tok)


def test_eval_retrieval_uses_the_captioned_examples_and_zero_shot_all(tmp_path):
  """One labelled example without captions must not switch retrieval off."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ito_jax.evaluate.evaluator import Evaluator  # pylint: disable=g-import-not-at-top
  from ito_jax.models import ito  # pylint: disable=g-import-not-at-top
  ex = h.shapes_examples(8, split='validation')
  h.write_folder(str(tmp_path / 'clean_in'), ex)
  h.write_folder(str(tmp_path / 'mixed_in'), ex)
  with open(tmp_path / 'mixed_in' / 'captions.jsonl', 'a') as f:  # sorts first by id
    f.write(json.dumps({'image': f'img/{ex[0]["id"]}.png', 'id': 'extra',
                        'label': synthetic.CLASS_NAMES[ex[0]['label']]}) + '\n')
  tok = tokenizer_lib.train_tokenizer([c for e in ex for c in e['captions']], str(tmp_path / 'tok'), 128)
  arrays = {}
  for name in ('clean', 'mixed'):
    convert.convert('folder', str(tmp_path / f'{name}_in'), str(tmp_path / name), progress=False)
    arrays[name] = pipeline.eval_arrays(h.micro_config(eval_source=str(tmp_path / name)), tok, 'x')
  clean, mixed = arrays['clean'], arrays['mixed']
  assert mixed['tokens'].shape == (9, 5, 16) and mixed['captioned'].tolist() == [False] + [True] * 8
  assert (mixed['tokens'][0] == 0).all() and (mixed['labels'] >= 0).all()
  np.testing.assert_array_equal(mixed['tokens'][1:], clean['tokens'])

  config = h.micro_config(eval_source=str(tmp_path / 'mixed'))
  names = pipeline.class_names(config)
  both = Evaluator(config, mixed, names, tok)
  assert both.zeroshot and both.retrieval and both.retrieval_rows.tolist() == list(range(1, 9))
  with nnx.use_eager_sharding(False):
    model = ito.ItoModel(config.model, rngs=nnx.Rngs(0))
  # Retrieval on the mixed set is retrieval on its captioned examples.
  got, want = Evaluator(config, mixed, [], tok).run(model), Evaluator(config, clean, [], tok).run(model)
  assert got.keys() == want.keys() and got
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert set(both.run(model)) > set(want)  # and zero-shot on all nine


@pytest.mark.slow
def test_train_from_every_kind_and_a_salted_source(converted, tmp_path):
  """The trainer on all three converted kinds plus the salted folder, mixed;
  held-out evaluation on a converted labels-only set: it trains, and
  metrics.jsonl counts every bad kind."""
  out, kinds, _ = converted
  # Held out: a labels-only set (zero-shot, no retrieval), like imagenet2012.
  examples = h.shapes_examples(30, split='test')
  os.makedirs(tmp_path / 'labels_only')
  rows = []
  for ex in examples:
    (tmp_path / 'labels_only' / f'{ex["id"]}.png').write_bytes(ex['image'])
    rows.append(json.dumps({'image': f'{ex["id"]}.png', 'label': ex['label']}) + '\n')
  (tmp_path / 'labels_only' / 'captions.jsonl').write_text(''.join(rows))
  convert.convert('folder', str(tmp_path / 'labels_only'), str(tmp_path / 'eval'),
                  class_names=list(synthetic.CLASS_NAMES), progress=False)
  config = h.micro_config(
      sources=(str(out / 'folder'), str(out / 'tar'), str(out / 'tfds'), str(out / 'salted')),
      eval_source=str(tmp_path / 'eval'), max_bad_fraction=0.5, bad_check_min_records=10)
  config.total_steps = 16
  config.log_every_steps = 8
  config.eval_every_steps = 16
  workdir = str(tmp_path / 'work')
  result = train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'data'))  # ito_shapes never built
  logged = [r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in r]
  assert [r['step'] for r in logged] == [8, 16] and all(np.isfinite(r['loss']) for r in logged)
  last = logged[-1]
  for kind in set(kinds.values()) - {'good'}:
    assert last[f'data/bad/{kind}'] >= 1, kind
  assert last['data/records_read'] - last['data/bad/total'] == 16 * 8
  assert 0 <= result['zeroshot/accuracy'] <= 1 and result['zeroshot/chance'] == 1 / 30
  assert not any(k.startswith('retrieval/') for k in result)  # no captions, no retrieval



def test_eval_resize_squashes_or_centre_crops_a_wide_image(tmp_path):
  """model.image.eval_resize decides how evaluation fits a non-square image:
  a 2:1 image with a red centre square and blue sides is squashed (blue at
  the left and right edges) or centre-cropped (red throughout)."""
  wide = np.zeros((32, 64, 3), np.uint8)
  wide[:, :, 2] = 255
  wide[:, 16:48] = (255, 0, 0)
  examples = [dict(ex, image=h.encode(Image.fromarray(wide), 'PNG')) for ex in h.shapes_examples(1)]
  h.write_folder(str(tmp_path / 'in'), examples)  # the first image is written as PNG, lossless
  convert.convert('folder', str(tmp_path / 'in'), str(tmp_path / 'wide'), progress=False)
  tok = tokenizer_lib.train_tokenizer(examples[0]['captions'] * 3, str(tmp_path / 'tok'), 64)
  images = {}
  for mode in ('squash', 'center_crop'):
    config = h.micro_config(eval_source=str(tmp_path / 'wide'))
    config.model.image.eval_resize = mode
    images[mode] = pipeline.eval_arrays(config, tok, 'ignored')['images'][0]  # [16, 16, 3] in [-1, 1]
  blue, red = np.array([-1.0, -1.0, 1.0]), np.array([1.0, -1.0, -1.0])
  squashed = images['squash']
  np.testing.assert_allclose(squashed[:, [0, -1]], np.broadcast_to(blue, (16, 2, 3)), atol=1e-6)
  np.testing.assert_allclose(squashed[:, 6:10], np.broadcast_to(red, (16, 4, 3)), atol=1e-6)
  np.testing.assert_allclose(images['center_crop'], np.broadcast_to(red, (16, 16, 3)), atol=1e-6)
