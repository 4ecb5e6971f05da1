"""One record schema for every image–text source, its byte format, and the
checks that decide whether a record can be trained on.

A record is an image (encoded bytes, any format PIL reads), a list of captions
(raw bytes, so text that is not UTF-8 survives conversion and is judged when
read), an optional integer label and an id. On disk (ArrayRecord shards written
by `ito_jax.data.convert`) a record is

    b'ITOR' | uint32 little-endian header length | header (JSON, UTF-8) | blobs

with header `{"id": str, "label": int|null, "image": len|null, "captions":
[len, ...]|null}` and the blobs (image bytes, then each caption) concatenated in
that order. No pickle: any reader in any language can parse it.

`parse` turns a `RawRecord` into an `Example` (RGB uint8 pixels, clean caption
strings) or raises `BadRecord(kind, ...)`. What can be repaired is repaired and
reported in `Example.repairs` (CMYK, 16-bit, grayscale, palette and alpha images
convert to RGB; bad captions among good ones are dropped; a photo's EXIF
orientation is applied, so it is upright as a viewer shows it, and an EXIF
block of which Pillow can read no tag is `corrupt_exif`); what cannot is one of
`BAD_KINDS`. Training counts both (see `ito_jax.data.bad_records`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAGIC = b'ITOR'
_LENGTH = struct.Struct('<I')

# Why a record is skipped. Order is the order checks run.
BAD_KINDS = (
    'corrupt_record',    # the serialized record itself does not parse
    'missing_field',     # no image, or no captions where captions are needed
    'empty_image',       # zero bytes
    'not_an_image',      # bytes no image decoder recognises
    'image_too_large',   # header dimensions above the pixel limit (decompression bomb)
    'truncated_image',   # a recognised image whose data ends early
    'corrupt_image',     # a recognised image whose data does not decode
    'unsupported_mode',  # decoded, but no sensible RGB conversion
    'non_utf8_caption',  # every caption failed one of these three checks;
    'empty_caption',     # the kind is that of the first failure
    'overlong_caption',
)

# File signatures: bytes that start like an image but fail to open are a broken
# image ('corrupt_image'), anything else is 'not_an_image'.
_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG', b'GIF8', b'BM', b'II*\x00', b'MM\x00*')


class BadRecord(Exception):
  """A record that cannot be trained on; `kind` is one of BAD_KINDS."""

  def __init__(self, kind: str, detail: str = ''):
    assert kind in BAD_KINDS, kind
    super().__init__(f'{kind}: {detail}' if detail else kind)
    self.kind, self.detail = kind, detail


@dataclasses.dataclass
class RawRecord:
  """Fields as stored; None means the field is absent."""
  id: str
  image: bytes | None = None
  captions: list[bytes] | None = None
  label: int | None = None
  corrupt: str = ''  # set when the serialized record could not be parsed
  # Kinds of captions an input reader left out before the record was built
  # (e.g. 'non_string_caption': JSON null or a number); counted, never stored.
  dropped: tuple[str, ...] = ()


@dataclasses.dataclass
class Example:
  """A record ready for augmentation."""
  id: str
  image: np.ndarray  # [H, W, 3] uint8 RGB
  captions: list[str]  # non-empty when captions are required
  label: int  # -1 when the record has none
  repairs: tuple[str, ...] = ()  # e.g. ('mode_cmyk', 'dropped_empty_caption')


@dataclasses.dataclass(frozen=True)
class Limits:
  max_image_pixels: int = 50_000_000
  max_caption_chars: int = 1000

  @classmethod
  def from_config(cls, data_config) -> 'Limits':
    return cls(max_image_pixels=data_config.max_image_pixels,
               max_caption_chars=data_config.max_caption_chars)


# ----------------------------------------------------------------- bytes
def to_bytes(text: bytes | str) -> bytes:
  # surrogateescape gives back the original bytes of text read with it (JSONL
  # lines or file names that were not valid UTF-8), so the reader can judge them.
  return text.encode('utf-8', 'surrogateescape') if isinstance(text, str) else bytes(text)


def encode(record: RawRecord) -> bytes:
  """RawRecord -> bytes in the format of the module docstring."""
  captions = None if record.captions is None else [to_bytes(c) for c in record.captions]
  header = {'id': record.id,
            'label': None if record.label is None else int(record.label),
            'image': None if record.image is None else len(record.image),
            'captions': None if captions is None else [len(c) for c in captions]}
  head = json.dumps(header, separators=(',', ':')).encode('utf-8', 'surrogateescape')
  return b''.join([MAGIC, _LENGTH.pack(len(head)), head, record.image or b'', *(captions or [])])


def decode(data: bytes, fallback_id: str = '?') -> RawRecord:
  """bytes -> RawRecord; never raises: a record that does not parse comes back
  with `corrupt` set (and `fallback_id` if its id is unreadable)."""
  try:
    if data[:4] != MAGIC:
      raise ValueError('bad magic')
    (n,) = _LENGTH.unpack_from(data, 4)
    header = json.loads(data[8:8 + n].decode('utf-8', 'surrogateescape'))
    offset, blobs = 8 + n, []
    for size in ([header['image']] if header['image'] is not None else []) + (header['captions'] or []):
      blobs.append(data[offset:offset + size])
      offset += size
    if offset != len(data):
      raise ValueError(f'blob lengths add up to {offset} bytes, record has {len(data)}')
    label = header.get('label')
    if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
      raise ValueError(f'label {label!r} is not an integer or null')
    image = blobs.pop(0) if header['image'] is not None else None
    return RawRecord(id=str(header.get('id') or fallback_id), image=image,
                     captions=None if header['captions'] is None else blobs, label=label)
  except (ValueError, KeyError, TypeError, struct.error) as e:
    return RawRecord(id=fallback_id, corrupt=f'{type(e).__name__}: {e}')


# ----------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> tuple[np.ndarray, str | None]:
  """Decoded PIL image of any mode -> ([H, W, 3] uint8, repair name or None)."""
  mode = img.mode
  if mode == 'RGB':
    return np.asarray(img), None
  if mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
    # 16-bit grey: PIL's convert('RGB') clips at 255 instead of rescaling.
    grey = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), 'mode_16bit'
  if mode == 'F':
    grey = np.asarray(img).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), 'mode_float'
  has_alpha = mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or 'transparency' in img.info
  if has_alpha:
    # Transparent pixels often hold junk colour; composite onto white, as a
    # viewer would show them.
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert('RGB')), 'mode_alpha'
  repair = {'L': 'mode_grayscale', 'P': 'mode_palette', 'CMYK': 'mode_cmyk',
            '1': 'mode_bilevel'}.get(mode, f'mode_{mode.lower()}')
  return np.asarray(img.convert('RGB')), repair


_EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
  """The image as a viewer shows it: a camera's EXIF orientation tag (a photo
  taken sideways is stored sideways with tag 6 or 8) applied and cleared."""
  try:
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's EXIF parser raises whatever the broken bytes trip (struct.error,
    # SyntaxError, ...); the pixels may be fine, but their orientation is unknown.
    raise BadRecord('corrupt_image', f'{img.format} EXIF: {type(e).__name__}: {e}') from None
  return img if orientation == 1 else ImageOps.exif_transpose(img)


def _open_upright(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[str, ...]]:
  """Opens, checks the size from the header alone, decodes and rotates upright;
  returns the image and its repairs, raises BadRecord."""
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadRecord('image_too_large', str(e)) from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    kind = 'corrupt_image' if data.startswith(_SIGNATURES) or data[8:12] == b'WEBP' else 'not_an_image'
    # Not str(e): PIL's message names the BytesIO's address, which would make
    # the logged detail differ from run to run.
    raise BadRecord(kind, f'{len(data)} bytes starting {data[:8]!r}: {type(e).__name__}') from None
  width, height = img.size
  if width * height > max_pixels:
    raise BadRecord('image_too_large', f'{width}x{height} > {max_pixels} pixels')
  if width == 0 or height == 0:
    raise BadRecord('corrupt_image', f'{width}x{height}')
  try:
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise OSError, SyntaxError, ValueError, struct.error, zlib.error,
    # ...: every failure here is a broken file, never a reason to stop.
    kind = 'truncated_image' if 'truncated' in str(e).lower() else 'corrupt_image'
    raise BadRecord(kind, f'{img.format} {width}x{height}: {e}') from None
  rotated = upright(img)
  # An EXIF block of which Pillow could read no tag (it warns and skips broken
  # ones): the image is kept as stored, as a viewer shows it, and counted.
  # Told from the parsed tags, not by recording Pillow's warning: while
  # catch_warnings(record=True) runs, every thread's warnings go to its list,
  # and two threads decoding at once could leave that in place.
  unreadable = bool(img.info.get('exif')) and len(img.getexif()) == 0
  return rotated, ('corrupt_exif',) if unreadable else ()


def decode_image(data: bytes | None, max_pixels: int) -> tuple[np.ndarray, tuple[str, ...]]:
  """Encoded bytes -> ([H, W, 3] uint8 RGB, repairs); raises BadRecord.

  The size check reads only the header (PIL opens lazily), so a decompression
  bomb is rejected before any pixel is allocated.
  """
  if data is None:
    raise BadRecord('missing_field', 'no image')
  if len(data) == 0:
    raise BadRecord('empty_image')
  if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
    # PIL warns above its own limit (89M pixels by default) and refuses more
    # than twice it at open, before our check. Raised once, process-wide, only
    # as far as a configured limit asks, so our limit decides and PIL warns
    # only of images our check then refuses. (Not hidden with
    # warnings.catch_warnings: that swaps process-wide state, which the
    # threads grain and the HTTP server decode in would race on.)
    Image.MAX_IMAGE_PIXELS = max_pixels
  img, repairs = _open_upright(data, max_pixels)
  try:
    pixels, repair = to_rgb(img)
  except (ValueError, OSError) as e:
    raise BadRecord('unsupported_mode', f'mode {img.mode}: {e}') from None
  return np.ascontiguousarray(pixels), repairs + ((repair,) if repair else ())


# ----------------------------------------------------------------- captions

def normalize_whitespace(text: str) -> str:
  """Newlines, tabs, runs of spaces and other Unicode whitespace -> one space,
  trimmed: what training and evaluation captions get, and serving's texts."""
  return ' '.join(text.split())


def decode_captions(captions: list[bytes] | None, max_chars: int,
                    required: bool = True) -> tuple[list[str], list[str]]:
  """Raw captions -> (clean texts, kinds of the dropped ones); raises BadRecord
  when `required` and no caption survives."""
  if captions is None or len(captions) == 0:
    if required:
      raise BadRecord('missing_field', 'no captions')
    return [], []
  texts, dropped = [], []
  for raw in captions:
    try:
      text = to_bytes(raw).decode('utf-8')
    except UnicodeDecodeError:
      dropped.append('non_utf8_caption')
      continue
    text = normalize_whitespace(text)
    if not text:
      dropped.append('empty_caption')
    elif len(text) > max_chars:
      dropped.append('overlong_caption')
    else:
      texts.append(text)
  if not texts and required:
    raise BadRecord(dropped[0], f'{len(captions)} caption(s), none usable')
  return texts, dropped


def parse(record: RawRecord, limits: Limits, require_captions: bool = True) -> Example:
  """RawRecord -> Example, repairing what can be repaired; raises BadRecord."""
  if record.corrupt:
    raise BadRecord('corrupt_record', record.corrupt)
  image, repairs = decode_image(record.image, limits.max_image_pixels)
  texts, dropped = decode_captions(record.captions, limits.max_caption_chars, require_captions)
  repairs += tuple(f'dropped_{k}' for k in dropped)
  label = -1 if record.label is None else int(record.label)
  return Example(id=record.id, image=image, captions=texts, label=label, repairs=repairs)
