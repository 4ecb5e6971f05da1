"""Small input files for the converter and bad-record tests: image folders
with captions files, webdataset tars, one file for every bad kind, and a
micro training config."""

import collections
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

from configs import tiny_cpu
from ito_jax.data import synthetic


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
  out = io.BytesIO()
  image.save(out, format=fmt, **kw)
  return out.getvalue()


def shapes_examples(n: int, split: str = 'train', seed: int = 0) -> list[dict]:
  """ito_shapes examples: PNG bytes, five captions, label, id."""
  return [synthetic.make_example(seed, split, i) for i in range(n)]


def write_folder(root: str, examples: list[dict], fmt: str = 'jsonl') -> str:
  """Images as PNG (even index) or JPEG (odd) under root/img/, one captions row
  per caption (rows of one image are merged by the converter), string labels."""
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  rows = []
  for i, ex in enumerate(examples):
    name = f'img/{ex["id"]}.{"png" if i % 2 == 0 else "jpg"}'
    data = ex['image'] if i % 2 == 0 else encode(Image.open(io.BytesIO(ex['image'])), 'JPEG', quality=95)
    with open(os.path.join(root, name), 'wb') as f:
      f.write(data)
    for caption in ex['captions']:
      rows.append({'image': name, 'caption': caption, 'label': synthetic.CLASS_NAMES[ex['label']],
                   'id': ex['id']})
  if fmt == 'jsonl':
    with open(os.path.join(root, 'captions.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  else:
    import csv  # pylint: disable=g-import-not-at-top
    with open(os.path.join(root, 'captions.csv'), 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=['image', 'caption', 'label', 'id'])
      writer.writeheader()
      writer.writerows(rows)
  return root


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def webdataset_members(examples: list[dict]) -> list[tuple[str, bytes]]:
  """key.jpg + key.txt (first caption) for even example indices, key.png + key.json
  (all captions and the label) + key.cls for odd ones."""
  members = []
  for ex in examples:
    key = f'shard/{ex["id"]}'
    if int(ex['id'].split('_')[-1]) % 2 == 0:  # by example index, whichever tar it goes to
      members += [(f'{key}.jpg', encode(Image.open(io.BytesIO(ex['image'])), 'JPEG', quality=95)),
                  (f'{key}.txt', ex['captions'][0].encode())]
    else:
      members += [(f'{key}.png', ex['image']),
                  (f'{key}.json', json.dumps({'captions': ex['captions']}).encode()),
                  (f'{key}.cls', str(ex['label']).encode())]
  return members


# ----------------------------------------------------------------- bad and odd files
def _png_with_size(width: int, height: int) -> bytes:
  """A tiny valid PNG whose header claims width x height (a decompression bomb)."""
  data = bytearray(encode(Image.new('L', (4, 4)), 'PNG'))
  data[16:24] = struct.pack('>II', width, height)  # IHDR payload starts at byte 16
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def bad_images(rng: np.random.Generator) -> dict[str, bytes]:
  """{name: bytes} of images no decoder can use, name prefixed by the kind."""
  pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  png, jpg = encode(Image.fromarray(pixels), 'PNG'), encode(Image.fromarray(pixels), 'JPEG')
  broken_png = bytearray(png)
  broken_png[len(png) // 2:len(png) // 2 + 40] = bytes(40)
  broken_jpg = bytearray(jpg)
  broken_jpg[200:400] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
  return {
      'empty_image': b'',
      'not_an_image': b'<html><body>404 not found</body></html>',
      'truncated_image.jpg': jpg[:len(jpg) // 2],
      'truncated_image.png': png[:len(png) // 2],
      'corrupt_image.png': bytes(broken_png),
      'corrupt_image.jpg': bytes(broken_jpg),
      'image_too_large.bomb': _png_with_size(100_000, 100_000),  # PIL's own bomb check
      'image_too_large.limit': _png_with_size(3000, 3000),  # above MAX_PIXELS below
  }


MAX_PIXELS = 1_000_000  # the tests' config.data.max_image_pixels


def odd_images(rng: np.random.Generator) -> dict[str, tuple[bytes, np.ndarray]]:
  """{repair: (bytes, expected RGB pixels)} of images that convert to RGB."""
  rgb = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (20, 20), dtype=np.uint8)
  grey16 = rng.integers(0, 65536, (20, 20)).astype(np.uint16)
  alpha = np.where(rng.random((20, 20)) < 0.5, 0, 255).astype(np.uint8)
  white = np.full_like(rgb, 255)
  palette = Image.fromarray(rgb).quantize(16)
  cmyk = Image.fromarray(rgb).convert('CMYK')
  return {
      'mode_grayscale': (encode(Image.fromarray(grey), 'PNG'), np.repeat(grey[..., None], 3, -1)),
      'mode_16bit': (encode(Image.fromarray(grey16), 'PNG'),
                     np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1)),
      'mode_palette': (encode(palette, 'PNG'), np.asarray(palette.convert('RGB'))),
      'mode_alpha': (encode(Image.fromarray(np.dstack([rgb, alpha])), 'PNG'),
                     np.where(alpha[..., None] == 255, rgb, white)),
      'mode_cmyk': (encode(cmyk, 'TIFF'), np.asarray(cmyk.convert('RGB'))),  # lossless CMYK
      'mode_bilevel': (encode(Image.fromarray(grey > 127), 'PNG'),
                       np.repeat(np.where(grey > 127, 255, 0).astype(np.uint8)[..., None], 3, -1)),
  }


def write_salted_folder(root: str, good: list[dict]) -> dict[str, str]:
  """A folder source holding the `good` examples plus records of every bad
  kind and every repairable mode; returns {id: kind} of the bad records (kind
  'good' for repaired ones, which must train)."""
  write_folder(root, good)
  rng = np.random.default_rng(0)
  rows, kinds = [], {}
  ok_caption = 'one red circle in the middle'
  for name, data in bad_images(rng).items():
    with open(os.path.join(root, 'img', name), 'wb') as f:
      f.write(data)
    rows.append({'image': f'img/{name}', 'caption': ok_caption, 'id': f'bad/{name}'})
    kinds[f'bad/{name}'] = name.split('.')[0]
  for name, (data, _) in odd_images(rng).items():
    with open(os.path.join(root, 'img', f'{name}.img'), 'wb') as f:
      f.write(data)
    rows.append({'image': f'img/{name}.img', 'caption': ok_caption, 'id': f'odd/{name}'})
    kinds[f'odd/{name}'] = 'good'
  image = f'img/{good[0]["id"]}.png'  # a good image (write_folder: even index -> PNG)
  for kind, captions in [('empty_caption', ['', '   ']), ('overlong_caption', ['word ' * 300]),
                         ('missing_field', [])]:
    rows.append({'image': image, 'captions': captions, 'id': f'bad/{kind}'})
    kinds[f'bad/{kind}'] = kind
  rows.append({'image': 'img/no_such_file.png', 'caption': ok_caption, 'id': 'bad/missing_image'})
  kinds['bad/missing_image'] = 'missing_field'
  rows.append({'image': image, 'captions': ['', ok_caption], 'id': 'odd/one_empty_caption'})
  kinds['odd/one_empty_caption'] = 'good'
  with open(os.path.join(root, 'captions.jsonl'), 'ab') as f:
    for row in rows:
      f.write(json.dumps(row).encode() + b'\n')
    # A caption that is not UTF-8 (JSON itself cannot say so: raw bytes in the line).
    f.write(b'{"image": "' + image.encode() + b'", "caption": "caf\xe9 \xff", "id": "bad/non_utf8"}\n')
  kinds['bad/non_utf8'] = 'non_utf8_caption'
  return kinds


# ----------------------------------------------------------------- config
def micro_config(**data):
  """tiny_cpu shrunk until compiling the step takes seconds, for tests that
  train a few steps."""
  c = tiny_cpu.get_config('runlocal')
  c.batch_size = 8
  c.total_steps = 6
  c.log_every_steps = 3
  c.eval_every_steps = 6
  c.model.embed_dim = 32
  c.model.image.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2)
  c.model.text.update(context_length=16, width=32, depth=1, num_heads=2)
  c.optim.warmup_steps = 2
  c.eval.batch_size = 32
  c.data.max_image_pixels = MAX_PIXELS
  c.data.update(data)
  return c



def ids_read_per_process(monkeypatch, make_dataset, transforms, batches: int, processes: int = 2) -> dict:
  """{class name: [(source, id) of the records process p's transforms read,
  for p in range(processes)]}
  after `batches` batches of `make_dataset(process_index, process_count)` for
  each process (in-process pipelines, data.num_workers = 0). Reads are told
  apart by the transform instance that made them, since an earlier process's
  iterator may still be prefetching in the background."""
  created, reads = [], collections.defaultdict(set)
  for t in transforms:
    def init(self, *args, _real=t.__init__, **kwargs):
      created.append(self)
      _real(self, *args, **kwargs)

    def noting(self, element, rng, _real=t.random_map):
      reads[id(self)].add((self.source, element.id))
      return _real(self, element, rng)

    monkeypatch.setattr(t, '__init__', init)
    monkeypatch.setattr(t, 'random_map', noting)
  per_process = []
  for p in range(processes):
    first = len(created)
    it = iter(make_dataset(p, processes))
    for _ in range(batches):
      next(it)
    per_process.append(created[first:])
  out = {t.__name__: [set() for _ in range(processes)] for t in transforms}
  for p, instances in enumerate(per_process):
    for instance in instances:
      out[type(instance).__name__][p] |= reads[id(instance)]
  return out


def write_convert_inputs(root, num: int):
  """The converter's inputs under `root` (a pathlib.Path), each holding the
  same `num` ito_shapes examples: jsonl/ and csv/ folders, tars/ (two
  webdataset shards, the second with a sample without a caption and one with
  an undecodable caption), and tfds/ (an ito_shapes build). Returns
  (examples, the TFDS builder)."""
  examples = shapes_examples(num)
  write_folder(str(root / 'jsonl'), examples, 'jsonl')
  write_folder(str(root / 'csv'), examples, 'csv')
  os.makedirs(root / 'tars')
  write_tar(str(root / 'tars' / 'a.tar'), webdataset_members(examples[:7]))
  write_tar(str(root / 'tars' / 'b.tar'), webdataset_members(examples[7:]) + [
      ('shard/no_caption.jpg', encode(Image.new('RGB', (8, 8)), 'JPEG')),
      ('shard/bad_text.jpg', encode(Image.new('RGB', (8, 8)), 'JPEG')),
      ('shard/bad_text.txt', b'\xff\xfe'),
  ])
  shapes = synthetic.prepare(str(root / 'tfds'), num_train=num, num_eval=40)
  return examples, shapes


def records_by_id(path: str) -> dict:
  """The records of an ArrayRecord output, by id."""
  from ito_jax.data import sources

  source = sources.ArrayRecordSource(path)
  return {r.id: r for r in (source[i] for i in range(len(source)))}
