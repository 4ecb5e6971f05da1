"""`ito_shapes`: a synthetic image–caption data set, generated offline as TFDS.

Each 64×64 scene holds a *main* group (1–3 objects of one colour × shape, one
size, and for a single object one of five positions) plus 0–2 small distractor
objects of other classes, on a tinted noisy background. Five captions per image
describe the main group with varied templates, synonyms and omitted attributes;
some also mention a distractor. The zero-shot `label` is colour × shape of the
main group (30 classes), which is also what a later issue holds out as "unseen".

Why it is shaped like this: many images share every attribute a caption names,
captions omit attributes, and distractors add confusable colour/shape words, so
a tiny model learns real structure in CPU minutes while retrieval stays far
from perfect.

Building uses TFDS's beam-free generator path and writes `array_record`, which
works without TensorFlow as long as images are handed over already PNG-encoded
(TFDS encodes numpy images with `tf.image.encode_png`). Read back with
`builder.as_data_source(split)`; `tfds.load` would need TensorFlow.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import re

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

IMAGE_SIZE = 64
NUM_CAPTIONS = 5

COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange')
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
SIZES = ('small', 'medium', 'large')
POSITIONS = ('left', 'right', 'top', 'bottom', 'center')
CLASS_NAMES = tuple(f'{c} {s}' for c in COLOURS for s in SHAPES)  # label = c * 5 + s

COLOUR_RGB = {'red': (215, 40, 40), 'green': (40, 185, 60), 'blue': (50, 90, 230),
        'yellow': (235, 220, 50), 'purple': (150, 60, 205), 'orange': (245, 140, 30)}
_RADIUS = {'small': (5, 6), 'medium': (8, 9), 'large': (12, 13)}  # inclusive, pixels

# --- caption lexicon (also used by tests to check that captions tell the truth)
COLOUR_WORDS = {'red': ('red', 'crimson', 'scarlet'), 'green': ('green', 'emerald'),
                'blue': ('blue', 'azure'), 'yellow': ('yellow', 'golden'),
                'purple': ('purple', 'violet'), 'orange': ('orange', 'amber')}
SHAPE_WORDS = {  # (singular, plural)
    'circle': (('circle', 'circles'), ('disc', 'discs'), ('round shape', 'round shapes')),
    'square': (('square', 'squares'), ('box', 'boxes'), ('block', 'blocks')),
    'triangle': (('triangle', 'triangles'), ('triangular shape', 'triangular shapes')),
    'diamond': (('diamond', 'diamonds'), ('rhombus', 'rhombuses')),
    'cross': (('cross', 'crosses'), ('plus sign', 'plus signs')),
}
_SIZE_WORDS = {'small': ('small', 'tiny', 'little'), 'medium': ('medium', 'medium-sized', 'mid-sized'),
               'large': ('large', 'big', 'huge')}
_COUNT_WORDS = {1: ('a', 'one', 'a single'), 2: ('two', 'a pair of', '2'),
                3: ('three', '3', 'a group of three')}
_POSITION_WORDS = {
    'left': ('on the left', 'at the left', 'on the left side', 'in the left part of the image'),
    'right': ('on the right', 'at the right', 'on the right side', 'in the right part of the image'),
    'top': ('at the top', 'near the top', 'in the upper part of the image', 'at the top of the picture'),
    'bottom': ('at the bottom', 'near the bottom', 'in the lower part of the image',
               'at the bottom of the picture'),
    'center': ('in the center', 'in the middle', 'at the centre', 'in the middle of the image'),
    None: ('scattered around', 'spread across the image', 'here and there'),
}
_POSITION_SHORT = {'left': 'left side', 'right': 'right side', 'top': 'top', 'bottom': 'bottom',
                   'center': 'center', None: 'scattered'}
_DISTRACTOR_CLAUSES = (', next to a {}', ' and a {}', ', with a {} nearby', ' beside a {}')

# Each template reads slots: n count, z size, c colour, s shape noun, p position,
# q short position, d distractor clause, v verb ("is"/"are"). The main group is
# always named before any distractor, so the first colour/shape word is the label.
_TEMPLATES = (
    '{n} {z} {c} {s} {p}{d}',
    '{n} {c} {s}, {z}, {q}',
    'there {v} {n} {z} {c} {s} {p}{d}',
    '{n} {c} {s} {p}',
    '{p}, {n} {z} {c} {s}',
    'a picture of {n} {c} {s}{d}',
    '{n} {z} {s} {p}, coloured {c}',
    '{c} {s}, {z}',
    'an image showing {n} {z} {c} {s} {p}',
    'the {c} {s} {p} {v} {z}',
    '{z} {c} {s} {p}',
)


# ----------------------------------------------------------------- scene drawing
def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb):
  """Plain (aliased) polygons: sharp edges, fast, byte-for-byte reproducible."""
  if shape == 'circle':
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
  elif shape == 'square':
    h = 0.85 * r  # roughly the circle's area
    draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=rgb)
  elif shape == 'triangle':
    draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=rgb)
  elif shape == 'diamond':
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
  elif shape == 'cross':
    t = 0.35 * r
    draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=rgb)
    draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=rgb)
  else:
    raise ValueError(f'unknown shape {shape!r}')


def _position_box(position: str | None, r: int) -> tuple[int, int, int, int]:
  """(x_lo, x_hi, y_lo, y_hi) for the object centre; the regions do not overlap."""
  lo, hi = r + 1, IMAGE_SIZE - 2 - r
  return {'left': (lo, 21, 22, 42), 'right': (43, hi, 22, 42), 'top': (22, 42, lo, 21),
          'bottom': (22, 42, 43, hi), 'center': (27, 37, 27, 37), None: (lo, hi, lo, hi)}[position]


def _place(rng: np.random.Generator, box, r: int, placed: list, tries: int = 40):
  """A centre in `box` whose disc keeps 2 px clear of every placed disc, or None."""
  for _ in range(tries):
    x, y = int(rng.integers(box[0], box[1] + 1)), int(rng.integers(box[2], box[3] + 1))
    if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr in placed):
      return x, y
  return None


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
  """Draws one scene; returns the image [64, 64, 3] uint8 and its true attributes."""
  colour, shape = COLOURS[rng.integers(6)], SHAPES[rng.integers(5)]
  count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
  size = SIZES[rng.integers(3 if count < 3 else 2)]  # three large ones do not fit
  position = POSITIONS[rng.integers(5)] if count == 1 else None

  background = rng.integers(20, 105) + rng.integers(-15, 16, size=3)
  img = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in background))
  draw = ImageDraw.Draw(img)
  jitter = lambda name: tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOUR_RGB[name])

  while True:  # re-lay the whole group until it fits (two or three tries at most)
    placed = []
    for _ in range(count):
      r = int(rng.integers(*_RADIUS[size], endpoint=True))
      xy = _place(rng, _position_box(position, r), r, placed)
      if xy is None:
        break
      placed.append((*xy, r))
    if len(placed) == count:
      break
  for x, y, r in placed:
    _draw(draw, shape, x, y, r, jitter(colour))

  distractors = []
  for _ in range(int(rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2]))):
    while True:  # any class but the main one, so the count stays true
      d_colour, d_shape = COLOURS[rng.integers(6)], SHAPES[rng.integers(5)]
      if (d_colour, d_shape) != (colour, shape):
        break
    r = int(rng.integers(*_RADIUS['small' if size != 'large' else 'medium'], endpoint=True))
    xy = _place(rng, _position_box(None, r), r, placed)
    if xy is not None:
      placed.append((*xy, r))
      _draw(draw, d_shape, *xy, r, jitter(d_colour))
      distractors.append((d_colour, d_shape))

  # [64, 64, 3] noise in 2×2 blocks: per-pixel at the model's 32×32, yet half the
  # PNG bytes and encode time of 64×64 per-pixel noise.
  noise = rng.normal(0, 6, (IMAGE_SIZE // 2, IMAGE_SIZE // 2, 3)).repeat(2, 0).repeat(2, 1)
  image = np.asarray(img, np.int16) + noise.astype(np.int16)
  attributes = dict(colour=colour, shape=shape, size=size, count=count, position=position,
                    distractors=distractors)
  return np.clip(image, 0, 255).astype(np.uint8), attributes


# ----------------------------------------------------------------- captions
def _caption(rng: np.random.Generator, template: str, a: dict) -> str:
  pick = lambda options: options[rng.integers(len(options))]
  k = a['count']
  d = ''
  if a['distractors'] and rng.random() < 0.35:
    d_colour, d_shape = a['distractors'][0]
    d = pick(_DISTRACTOR_CLAUSES).format(f'{pick(COLOUR_WORDS[d_colour])} {pick(SHAPE_WORDS[d_shape])[0]}')
  text = template.format(
      n=pick(_COUNT_WORDS[k]), z=pick(_SIZE_WORDS[a['size']]), c=pick(COLOUR_WORDS[a['colour']]),
      s=pick(SHAPE_WORDS[a['shape']])[0 if k == 1 else 1], p=pick(_POSITION_WORDS[a['position']]),
      q=_POSITION_SHORT[a['position']], d=d, v='is' if k == 1 else 'are')
  return re.sub(r'\ba (?=[aeiou])', 'an ', text)  # "a amber disc" -> "an amber disc"


def captions_for(rng: np.random.Generator, attributes: dict) -> list[str]:
  """NUM_CAPTIONS distinct captions, each from a different template."""
  order = rng.permutation(len(_TEMPLATES))
  captions = []
  for t in order:
    text = _caption(rng, _TEMPLATES[t], attributes)
    if text not in captions:
      captions.append(text)
    if len(captions) == NUM_CAPTIONS:
      return captions
  raise AssertionError('templates cannot give distinct captions')  # 11 templates >> 5


_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}


def _class_id(colour: str, shape: str) -> int:
  return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)  # CLASS_NAMES' order


def make_example(seed: int, split: str, index: int) -> dict:
  """Example `index` of `split`: a pure function of its arguments (no split sizes),
  so a larger build extends a smaller one and any example can be regenerated."""
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  image, a = _scene(rng)
  png = io.BytesIO()
  Image.fromarray(image).save(png, format='PNG', compress_level=1)  # fast, fixed bytes
  return {'image': png.getvalue(), 'captions': captions_for(rng, a),
          'label': _class_id(a['colour'], a['shape']),
          'id': f'{split}_{index:06d}'}


def scene_classes(seed: int, split: str, index: int) -> tuple[int, ...]:
  """Every class drawn in example `index` of `split`: its label, then its
  distractors' classes. Replays make_example's draws (about 0.3 ms), so it
  needs no field in the stored records."""
  _, a = _scene(np.random.default_rng([seed, _SPLIT_IDS[split], index]))
  return (_class_id(a['colour'], a['shape']), *(_class_id(c, s) for c, s in a['distractors']))


def example_index(record_id: str, split: str) -> int:
  """The index make_example was called with, from the id it gave the record."""
  prefix = f'{split}_'
  if not record_id.startswith(prefix) or not record_id[len(prefix):].isdigit():
    raise ValueError(f'ito_shapes record id {record_id!r} is not {prefix}NNNNNN')
  return int(record_id[len(prefix):])


# ----------------------------------------------------------------- TFDS builder
@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  num_train: int = 8000
  num_eval: int = 500  # validation and test each
  seed: int = 0


def _config_name(num_train: int, num_eval: int, seed: int) -> str:
  return f'train{num_train}_eval{num_eval}_seed{seed}'


class ItoShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with five captions each; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [ShapesConfig(name=_config_name(8000, 500, 0))]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default looks the package up through `importlib_resources`, which it
    # only installs for Python < 3.9, so preparing a builder that lives inside a
    # package fails on 3.11 with ModuleNotFoundError. This file is the answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` wants a package dir with
    # README/CITATIONS files that this module does not ship.
    return tfds.core.DatasetInfo(
        builder=self,
        description='Synthetic coloured shapes with five captions each (ito_jax).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            'id': tfds.features.Text(),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'validation': self._generate_examples('validation', c.num_eval),
            'test': self._generate_examples('test', c.num_eval)}

  def _generate_examples(self, split: str, num: int):
    for i in range(num):
      yield i, make_example(self.builder_config.seed, split, i)


def prepare(data_dir: str, num_train: int = 8000, num_eval: int = 500, seed: int = 0) -> ItoShapes:
  """Returns the builder, generating the data first if it is not there yet.

  Each (num_train, num_eval, seed) lives in its own config directory. A file lock
  serializes concurrent callers (e.g. several processes of one job on a shared
  disk): the first builds, the others wait and then find it prepared.
  """
  name = _config_name(num_train, num_eval, seed)
  # The predefined config goes by name: a builder pickled into grain workers is
  # rebuilt from its constructor arguments, and TFDS rejects a *copy* of a
  # predefined config object as a "custom config with a taken name".
  config = name if name in ItoShapes.builder_configs else ShapesConfig(
      name=name, num_train=num_train, num_eval=num_eval, seed=seed)
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'.ito_shapes_{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = ItoShapes(data_dir=data_dir, config=config, file_format='array_record')
      if not builder.is_prepared():
        builder.download_and_prepare(download_dir=os.path.join(data_dir, 'downloads'))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  return list(builder.info.features['label'].names)


def train_captions(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Every caption of the train split (tokenizer training); images are not decoded."""
  source = builder.as_data_source('train', decoders={'image': tfds.decode.SkipDecoding()})
  return [c.decode() for i in range(len(source)) for c in source[i]['captions']]
