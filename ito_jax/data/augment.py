"""Per-example image and text augmentations: numpy + PIL, run inside grain workers.

Every random choice draws from the `np.random.Generator` passed in (grain hands
each record its own, seeded from the pipeline seed and the record index), so a
pipeline is reproducible and its checkpointed iterator resumes exactly.

What stays true to the captions, and why:
* No hue change: the captions name colours, so jitter only scales brightness and
  contrast (the same factor on every channel keeps hue).
* Horizontal flip is per *sample*, not per view: the captions say left/right, and
  one sample's image views share its captions, so a flip mirrors the source image
  once and swaps left/right in all its captions (`flip_sample`).
* Random resized crops may cut an object or move it relative to the frame, which
  can make a position or count word wrong for that view. That is the usual price
  of crop augmentation in CLIP-style training; keep `crop_scale`'s lower end high
  (e.g. 0.5+) on this data set.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
from PIL import Image


# ----------------------------------------------------------------- images
def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop of `image` [H, W, 3] uint8, resized to [size, size, 3] uint8.

  Crop area ~ U(scale) · H·W and log aspect ratio ~ U(log ratio); sub-pixel boxes
  are fine since PIL resamples from a float box (antialiased when shrinking).
  An image whose own aspect lies outside `ratio` (say 16:9) rarely holds such
  a box (at scale (0.7, 1) a 320x180 image held one in 1 of 10 draws, a
  400x200 one never), so there the area share is taken of the largest box of
  the drawn aspect that fits: its views still differ.
  """
  h, w = image.shape[:2]
  if not ratio[0] <= w / h <= ratio[1]:
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    area = min(w * w / aspect, h * h * aspect) * rng.uniform(*scale)
    cw, ch = min(math.sqrt(area * aspect), w), min(math.sqrt(area / aspect), h)
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    box = (x0, y0, x0 + cw, y0 + ch)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if cw <= w and ch <= h:
      x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      break
  else:  # extreme ratio for this image: take the whole frame
    x0, y0, cw, ch = 0.0, 0.0, float(w), float(h)
  box = (x0, y0, x0 + cw, y0 + ch)
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))


EVAL_RESIZE_MODES = ('squash', 'center_crop')


def resize(image: np.ndarray, size: int, mode: str = 'squash') -> np.ndarray:
  """Deterministic evaluation view [size, size, 3] of `image` [H, W, 3] uint8.

  'squash' resizes the whole frame, stretching a non-square one (big_vision's
  `resize`); 'center_crop' takes the largest centred square and resizes that
  (open_clip's eval transform), keeping the aspect and losing the edges of
  the longer side."""
  if mode not in EVAL_RESIZE_MODES:
    raise ValueError(f'unknown resize mode {mode!r}; expected one of {EVAL_RESIZE_MODES}')
  h, w = image.shape[:2]
  if mode == 'center_crop' and h != w:
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    image = image[y0:y0 + side, x0:x0 + side]  # cut first: no pixel outside the square is read
  if image.shape[0] == image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR))


def jitter_brightness_contrast(image: np.ndarray, rng: np.random.Generator,
                               brightness: float = 0.2, contrast: float = 0.2) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] in [0, 255], hue untouched (see module doc)."""
  x = image.astype(np.float32) * rng.uniform(1 - brightness, 1 + brightness)
  mean = x.mean()  # one grey level for all channels, so contrast keeps hue too
  x = mean + (x - mean) * rng.uniform(1 - contrast, 1 + contrast)
  return np.clip(x, 0.0, 255.0)


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """[0, 255] (uint8 or float) -> float32 in [-1, 1]."""
  return (np.asarray(image, np.float32) * (2.0 / 255.0) - 1.0).astype(np.float32)


def image_view(image: np.ndarray, rng: np.random.Generator, size: int,
               crop_scale: tuple[float, float]) -> np.ndarray:
  """One training view: crop -> resize -> brightness/contrast -> [-1, 1].
  Returns float32 [size, size, 3]."""
  crop = random_resized_crop(image, rng, size, crop_scale)
  return to_unit_range(jitter_brightness_contrast(crop, rng))


_LEFT_RIGHT = re.compile(r'\b(left|right)\b', re.IGNORECASE)


def _swap_left_right(match: re.Match) -> str:
  word = match.group(1)
  other = 'right' if word.lower() == 'left' else 'left'
  if word.isupper():
    return other.upper()
  return other.capitalize() if word[0].isupper() else other


def flip_captions(captions: Sequence[str]) -> list[str]:
  """Swaps the words left <-> right in any case, keeping the word's case
  (Left -> Right, LEFT -> RIGHT), matching a horizontally mirrored image."""
  return [_LEFT_RIGHT.sub(_swap_left_right, c) for c in captions]


def flip_sample(image: np.ndarray, captions: Sequence[str]) -> tuple[np.ndarray, list[str]]:
  """Mirrors the image [H, W, 3] left-right and keeps its captions true."""
  return np.ascontiguousarray(image[:, ::-1]), flip_captions(captions)


# ----------------------------------------------------------------- texts
def drop_clause(text: str, rng: np.random.Generator) -> str:
  """Sub-sentence sampling: drops one random comma-separated part after the
  first, if there are at least two. Later parts hold extra attributes or a
  distractor (', next to a blue square'); the first names the subject, and a
  view without it can name only the distractor's class. (One ito_shapes
  template, '{p}, {n} {z} {c} {s}', leads with the position instead: its views
  keep only the position, true but weak.)"""
  parts = [p.strip() for p in text.split(',') if p.strip()]
  if len(parts) < 2:
    return text
  del parts[1 + rng.integers(len(parts) - 1)]
  return ', '.join(parts)


def word_dropout(text: str, rng: np.random.Generator, rate: float) -> str:
  """Drops each word with probability `rate`, always keeping at least one."""
  words = text.split()
  if rate <= 0 or len(words) < 2:
    return text
  keep = rng.random(len(words)) >= rate
  if not keep.any():
    keep[rng.integers(len(words))] = True
  return ' '.join(w for w, k in zip(words, keep) if k)


def text_views(captions: Sequence[str], rng: np.random.Generator, num_views: int,
               dropout: float) -> list[str]:
  """`num_views` texts for one sample: distinct captions drawn without
  replacement first; past the number of captions, augmented copies (clause drop
  then word dropout of a random caption), preferring texts not yet used."""
  captions = list(dict.fromkeys(captions))  # distinct, in order
  if not captions:
    raise ValueError('a sample needs at least one caption')
  take = min(num_views, len(captions))
  views = [captions[i] for i in rng.choice(len(captions), take, replace=False)]
  while len(views) < num_views:
    for _ in range(5):  # a few tries for a new text; repeats are allowed after
      text = word_dropout(drop_clause(captions[rng.integers(len(captions))], rng), rng, dropout)
      if text not in views:
        break
    views.append(text)
  return views
