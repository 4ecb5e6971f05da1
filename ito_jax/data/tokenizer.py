"""SentencePiece tokenizer, trained offline on the project's own captions.

Ids: pad = 0, unk = 1, eos = 2, no bos. A text tower reads the EOS position (or
masks on pad), so `encode_batch` always keeps EOS, even when it truncates.

The tokenizer holds the serialized model proto (bytes), not a live
`SentencePieceProcessor`: pickling it into grain worker processes ships the
bytes, and each process builds its processor lazily on first use.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


class Tokenizer:
  """Batch encoder to fixed-length int32 ids; see the module docstring."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = None  # built on first use, per process

  @classmethod
  def load(cls, model_path: str) -> 'Tokenizer':
    return cls(epath.Path(model_path).read_bytes())  # local or gs://

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    return self._sp

  def __getstate__(self):
    return {'model_proto': self._proto}

  def __setstate__(self, state):
    self.__init__(state['model_proto'])

  @property
  def vocab_size(self) -> int:
    """Actual size of the vocabulary (may be below what training asked for:
    `hard_vocab_limit=False` lets a small corpus stop early). Size embedding
    tables with this."""
    return self.processor.get_piece_size()

  def encode_batch(self, texts: Sequence[str], context_length: int) -> np.ndarray:
    """Token ids, EOS appended, truncated so EOS stays last, padded with 0."""
    if context_length < 1:
      raise ValueError(f'context_length must be >= 1, got {context_length}')
    # One call per text: sentencepiece's list API starts a thread pool per call,
    # ~30x slower for the handful of captions a grain record holds.
    pieces = [self.processor.encode(t, out_type=int) for t in texts]
    tokens = np.full((len(texts), context_length), PAD_ID, np.int32)  # [batch, length]
    for row, ids in zip(tokens, pieces):
      ids = ids[:context_length - 1] + [EOS_ID]
      row[:len(ids)] = ids
    return tokens

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids, stopping at the first EOS; pads are skipped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self.processor.decode([i for i in ids if i != PAD_ID])


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int) -> Tokenizer:
  """Trains a unigram SentencePiece model on `texts`, writes it to `model_path`.

  `hard_vocab_limit=False` makes `vocab_size` an upper bound, so a small caption
  corpus with a few hundred distinct words still trains at vocab 512–8192; the
  real size is `Tokenizer.vocab_size`. Text is NFKC-normalized and case-folded.
  """
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError('train_tokenizer needs at least one non-empty text')
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto,
        vocab_size=vocab_size, model_type='unigram', hard_vocab_limit=False,
        character_coverage=1.0, normalization_rule_name='nmt_nfkc_cf',
        pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1,
        num_threads=1, minloglevel=2,  # quiet; one thread keeps output reproducible
    )
  except RuntimeError as e:
    raise ValueError(f'SentencePiece could not train a vocab of {vocab_size} on '
                     f'{len(texts)} texts: {e}') from e
  save(proto.getvalue(), model_path)
  return Tokenizer(proto.getvalue())


def save(model_bytes: bytes, model_path: str) -> None:
  """Writes a serialized sentencepiece model to `model_path` (local or gs://)."""
  path = epath.Path(model_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written whole beside the target, then renamed over it (os.replace locally,
  # a copy that appears complete on object stores): an interrupted write leaves
  # no truncated model that a later run would reuse.
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  tmp.write_bytes(model_bytes)
  tmp.replace(path)
