"""The encoder-only export: what serving needs and nothing else.

  DIR/export/
    manifest.json      format, version, step, every array's name/shape/dtype, templates,
                       the tokenizer's sha256 and vocab size
    model_config.json  the `model` config section as serving builds it: fusion disabled (no
                       head), no patch dropout, cudnn attention as xla (any backend)
    params.npz         image tower, text tower, projections, log_scale, logit_bias
    tokenizer.model    the run's sentencepiece model

Left out on purpose: the fusion head (training-only), the optimizer state and
the data position. `params.npz` is a plain numpy zip read with
`allow_pickle=False`, so loading executes no pickle and needs no devices of any
particular count; bfloat16 arrays are stored as their uint16 bits and named
bfloat16 in the manifest (numpy has no bfloat16 of its own).

`load` checks everything before it builds anything: a missing file, an array
whose shape or dtype differs from the manifest, a model config whose
parameters differ from the weights, or a tokenizer whose sha256 or vocab size
differs from the manifest's raises ExportError naming the file and the
parameter; no half-loaded model is ever returned.

  python -m ito_jax.main export --workdir=DIR   # from DIR's latest checkpoint
  python -m ito_jax.export --workdir=DIR        # the same
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from configs import common
from ito_jax.cli import UserError
from ito_jax.data.tokenizer import Tokenizer
from ito_jax.models import ito

FORMAT, VERSION = "ito_jax.export", 1
MANIFEST, CONFIG, PARAMS, TOKENIZER = "manifest.json", "model_config.json", "params.npz", "tokenizer.model"
FILES = (MANIFEST, CONFIG, PARAMS, TOKENIZER)


class ExportError(UserError, ValueError):
  """A bad export; the message names the file and what is wrong with it."""


# =============================================================================
# Parameters as a flat {name: array} map
# =============================================================================
def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def flatten(tree) -> dict:
  """Nested dict -> {"image_tower/encoder/blocks/0/mlp/kernel": leaf, ...}."""
  return {"/".join(_key(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten_like(abstract_tree, flat: dict):
  """`flat` arranged in `abstract_tree`'s structure (whose key types it keeps)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
  return jax.tree_util.tree_unflatten(
      treedef, [flat["/".join(_key(k) for k in path)] for path, _ in paths])


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # sharded across hosts
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def serving_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model section as serving builds it: the same towers, no fusion head,
  and none of the training-only settings (`_for_serving`)."""
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.fusion.enabled = False
  _for_serving(c)
  c.lock()
  return c


def _for_serving(c: ml_collections.ConfigDict) -> None:
  """Training-only model settings, set to what serving runs, in place.

  Serving encodes every patch: no patch dropout, and no FLIP unmasked phase,
  whose length counts training steps (and would fail validation against the
  default total_steps when it is longer). cudnn attention runs only on NVIDIA
  GPUs; xla computes the same values on any backend, so an export serves
  wherever it is loaded."""
  c.image.patch_dropout = 0.0
  c.image.unmasked_final_steps = 0
  if c.attention == "cudnn":
    c.attention = "xla"


def abstract_model(model_config: ml_collections.ConfigDict) -> ito.ItoModel:
  """The model's structure without allocating it, outside any mesh: serving
  places the arrays on one device, whatever the training mesh was."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: ito.ItoModel(model_config, rngs=nnx.Rngs(0)))


def abstract_encoder_params(model_config: ml_collections.ConfigDict) -> dict:
  """Pure dict of ShapeDtypeStructs: every parameter of the inference path."""
  return nnx.to_pure_dict(nnx.state(abstract_model(model_config), ito.encoder_filter()))


# =============================================================================
# Writing
# =============================================================================
def _encode(array: np.ndarray) -> tuple[np.ndarray, str]:
  dtype = str(array.dtype)
  if dtype == "bfloat16":
    return array.view(np.uint16), dtype
  return array, dtype


def _path(path) -> epath.Path:
  """Local paths made absolute; gs:// and other remote paths as they are."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def write(params: dict, model_config: ml_collections.ConfigDict, tokenizer_path: str,
          export_dir: str, *, step: int, templates=(), trained_with_fusion: bool = False) -> str:
  """Writes an export from flat host arrays. The files go to a temporary
  sibling directory first, which then replaces `export_dir` (the old export
  moved aside, and deleted only once the new one is in place)."""
  tokenizer_bytes = _path(tokenizer_path).read_bytes()
  try:
    vocab_size = Tokenizer(tokenizer_bytes).vocab_size
  except RuntimeError as e:
    raise ValueError(f"cannot export: {tokenizer_path} is not a sentencepiece model ({e})") from e
  if vocab_size > model_config.text.vocab_size:  # load would refuse it: ids past the table embed as NaN
    raise ValueError(f"cannot export: {tokenizer_path} has {vocab_size} pieces, more than "
                     f"model.text.vocab_size {model_config.text.vocab_size}")
  export_dir = _path(export_dir)
  tmp = export_dir.parent / f"{export_dir.name}.tmp-{os.getpid()}"
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  stored, entries = {}, {}
  for name, array in sorted(params.items()):
    stored[name], dtype = _encode(np.asarray(array))
    entries[name] = {"shape": list(array.shape), "dtype": dtype}
  with (tmp / PARAMS).open("wb") as f:
    np.savez(f, **stored)
  (tmp / CONFIG).write_text(serving_model_config(model_config).to_json_best_effort(indent=2))
  (tmp / TOKENIZER).write_bytes(tokenizer_bytes)
  manifest = {"format": FORMAT, "version": VERSION, "step": int(step),
              "param_count": int(sum(np.prod(e["shape"], dtype=np.int64) for e in entries.values())),
              "trained_with_fusion": bool(trained_with_fusion), "templates": list(templates),
              "files": list(FILES), "params": entries,
              "tokenizer": {"sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
                            "vocab_size": vocab_size}}
  (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
  if export_dir.exists():
    # The old export is set aside whole, not deleted, until the new one is in
    # place: export_dir never holds a half-deleted export (rmtree first did,
    # while it ran), and a failed rename puts the old one back.
    old = export_dir.parent / f"{export_dir.name}.old-{os.getpid()}"
    if old.exists():
      old.rmtree()
    export_dir.rename(old)
    try:
      tmp.rename(export_dir)
    except BaseException:
      old.rename(export_dir)
      raise
    old.rmtree()
  else:
    tmp.rename(export_dir)
  logging.info("export: %d parameters (%d arrays) written to %s",
               manifest["param_count"], len(entries), export_dir)
  return str(export_dir)


def export_model(model: ito.ItoModel, config: ml_collections.ConfigDict, tokenizer_path: str,
                 export_dir: str, *, step: int) -> str | None:
  """Exports a live model's inference path (all processes call; process 0 writes)."""
  params = {name: _to_host(x) for name, x in
            flatten(nnx.to_pure_dict(nnx.state(model, ito.encoder_filter()))).items()}
  if jax.process_index() != 0:
    return None
  return write(params, config.model, tokenizer_path, export_dir, step=step,
               templates=config.eval.templates, trained_with_fusion=config.model.fusion.enabled)


def export_checkpoint(workdir: str, export_dir: str | None = None) -> str:
  """Exports the latest checkpoint in WORKDIR/checkpoints, reading only the
  encoder parameters (no optimizer state, no fusion head) onto one device."""
  from ito_jax import checkpoint  # orbax only where checkpoints are read
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first")
  config = ckpt.saved_config(step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        abstract_encoder_params(config.model))
  params = ckpt.restore_params({"model": target}, step)["model"]
  return write({k: _to_host(v) for k, v in flatten(params).items()}, config.model,
               _path(workdir) / "tokenizer.model", export_dir or _path(workdir) / "export", step=step,
               templates=config.eval.templates, trained_with_fusion=config.model.fusion.enabled)


# =============================================================================
# Loading: validate everything, then build
# =============================================================================
@dataclasses.dataclass
class Export:
  model: ito.ItoModel  # encoder-only (fusion_head is None)
  model_config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  manifest: dict


def _fail(export_dir, file: str, message: str):
  raise ExportError(f"bad export {export_dir}: {file}: {message}")


def _read_model_config(export_dir: epath.Path) -> ml_collections.ConfigDict:
  try:
    saved = json.loads((export_dir / CONFIG).read_text())
  except (OSError, ValueError) as e:
    _fail(export_dir, CONFIG, f"unreadable JSON ({e})")
  config = common.base_config()
  try:
    config.model.update(saved)
  except (AttributeError, KeyError, TypeError) as e:
    _fail(export_dir, CONFIG, f"unknown or mistyped field ({e})")
  if config.model.fusion.enabled:
    _fail(export_dir, CONFIG, "model.fusion.enabled is true; exports hold no fusion head")
  _for_serving(config.model)  # exports written before these were reset still load
  try:
    common.validate(config)
  except common.ConfigError as e:
    _fail(export_dir, CONFIG, str(e))
  return config.model


def _is_shape(value) -> bool:
  return isinstance(value, list) and all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _check_manifest(export_dir, manifest) -> None:
  """The manifest's structure, before any field of it is used."""
  if not isinstance(manifest, dict):
    _fail(export_dir, MANIFEST, f"expected a JSON object, got {type(manifest).__name__}")
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    _fail(export_dir, MANIFEST, f"format {manifest.get('format')!r} version "
                                f"{manifest.get('version')!r}; expected {FORMAT!r} version {VERSION}")
  params = manifest.get("params")
  if not isinstance(params, dict):
    _fail(export_dir, MANIFEST, "'params' is missing" if params is None else
          f"'params' must be an object {{name: {{shape, dtype}}}}, got {type(params).__name__}")
  for name, entry in params.items():
    if not (isinstance(entry, dict) and _is_shape(entry.get("shape"))
            and isinstance(entry.get("dtype"), str)):
      _fail(export_dir, MANIFEST, f"params entry {name!r} must be {{'shape': [int, ...], "
                                  f"'dtype': str}}, got {json.dumps(entry)[:100]}")
  tokenizer = manifest.get("tokenizer")  # absent from exports older than the field
  if tokenizer is not None and not (
      isinstance(tokenizer, dict) and isinstance(tokenizer.get("sha256"), str)
      and isinstance(tokenizer.get("vocab_size"), int) and not isinstance(tokenizer["vocab_size"], bool)):
    _fail(export_dir, MANIFEST, f"'tokenizer' must be {{'sha256': str, 'vocab_size': int}}, got "
                                f"{json.dumps(tokenizer)[:100]}")
  templates = manifest.get("templates", [])
  if not (isinstance(templates, list) and all(isinstance(t, str) for t in templates)):
    _fail(export_dir, MANIFEST, f"'templates' must be a list of strings, got "
                                f"{json.dumps(templates)[:100]}")


def _read_params(export_dir, manifest: dict) -> dict:
  """{name: array} from params.npz, checked against the manifest entry by entry."""
  try:
    with (epath.Path(export_dir) / PARAMS).open("rb") as f, np.load(f, allow_pickle=False) as npz:
      raw = {name: npz[name] for name in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    _fail(export_dir, PARAMS, f"unreadable ({type(e).__name__}: {e})")
  entries = manifest["params"]
  missing, extra = sorted(set(entries) - set(raw)), sorted(set(raw) - set(entries))
  if missing or extra:
    _fail(export_dir, PARAMS, f"arrays differ from {MANIFEST}: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
  params = {}
  for name, entry in entries.items():
    array, dtype = raw[name], entry["dtype"]
    if dtype == "bfloat16":
      array = array.view(jnp.bfloat16) if array.dtype == np.uint16 else array
    if list(array.shape) != list(entry["shape"]) or str(array.dtype) != dtype:
      _fail(export_dir, PARAMS, f"shape mismatch: {name} is {array.dtype}{list(array.shape)} "
                                f"but {MANIFEST} records {dtype}{list(entry['shape'])}")
    params[name] = array
  return params


def param_differences(params: dict, expected: dict, dtypes: bool = True) -> list[str]:
  """What differs between weights {name: array} and the parameters a config
  builds {name: ShapeDtypeStruct}: names on one side only, and shapes (and,
  with `dtypes`, dtypes). Empty when they match."""
  describe = lambda x: f"{x.dtype if dtypes else ''}{list(x.shape)}"
  problems = [f"{n} is in the weights but not in the model the config builds"
              for n in sorted(set(params) - set(expected))]
  problems += [f"{n} is missing from the weights" for n in sorted(set(expected) - set(params))]
  problems += [f"{n}: weights {describe(params[n])}, config implies {describe(expected[n])}"
               for n in sorted(set(params) & set(expected))
               if tuple(params[n].shape) != tuple(expected[n].shape)
               or (dtypes and params[n].dtype != expected[n].dtype)]
  return problems


@dataclasses.dataclass
class Weights:
  """A validated export, read to the host: nothing placed on a device yet."""
  model_config: ml_collections.ConfigDict
  params: dict  # {"image_tower/...": np.ndarray}, the names flatten() gives
  tokenizer: Tokenizer
  tokenizer_bytes: bytes
  manifest: dict


def read(export_dir: str) -> Weights:
  """Validates an export and reads it to the host. Raises ExportError (naming
  the file and parameter) on any inconsistency."""
  export_dir = _path(export_dir)
  if not export_dir.is_dir():
    raise ExportError(f"bad export {export_dir}: not a directory")
  missing = [f for f in FILES if not (export_dir / f).is_file()]
  if missing:
    _fail(export_dir, ", ".join(missing), "missing file" + ("s" if len(missing) > 1 else ""))
  try:
    manifest = json.loads((export_dir / MANIFEST).read_text())
  except (OSError, ValueError) as e:
    _fail(export_dir, MANIFEST, f"unreadable JSON ({e})")
  _check_manifest(export_dir, manifest)
  model_config = _read_model_config(export_dir)
  params = _read_params(export_dir, manifest)

  # The config must describe exactly these weights: same names, shapes, dtypes.
  problems = param_differences(params, flatten(abstract_encoder_params(model_config)))
  if problems:
    _fail(export_dir, CONFIG, f"does not match {PARAMS} ({len(problems)} problems): "
                              + "; ".join(problems[:5]))

  try:
    tokenizer_bytes = (export_dir / TOKENIZER).read_bytes()
  except OSError as e:
    _fail(export_dir, TOKENIZER, f"unreadable ({e})")
  recorded = manifest.get("tokenizer")
  if recorded is not None:
    digest = hashlib.sha256(tokenizer_bytes).hexdigest()
    if digest != recorded["sha256"]:
      _fail(export_dir, TOKENIZER, f"sha256 {digest} differs from {recorded['sha256']} in "
                                   f"{MANIFEST}: the file is truncated or was replaced")
  try:
    tokenizer = Tokenizer(tokenizer_bytes)
    vocab = tokenizer.vocab_size
  except RuntimeError as e:
    _fail(export_dir, TOKENIZER, f"not a sentencepiece model ({e})")
  if recorded is not None and vocab != recorded["vocab_size"]:
    _fail(export_dir, TOKENIZER, f"{vocab} pieces, but {MANIFEST} records vocab_size "
                                 f"{recorded['vocab_size']}")
  if vocab > model_config.text.vocab_size:
    _fail(export_dir, TOKENIZER, f"{vocab} pieces, more than {CONFIG} text.vocab_size "
                                 f"{model_config.text.vocab_size}")
  return Weights(model_config, params, tokenizer, tokenizer_bytes, manifest)


def load(export_dir: str) -> Export:
  """Validates and loads an export onto the default device (`read`'s checks;
  no half-loaded model is ever returned)."""
  weights = read(export_dir)
  model = abstract_model(weights.model_config)
  graphdef, state = nnx.split(model)
  abstract_params = nnx.to_pure_dict(nnx.state(model, ito.encoder_filter()))
  nnx.replace_by_pure_dict(state, unflatten_like(
      abstract_params, {k: jnp.asarray(v) for k, v in weights.params.items()}))
  return Export(nnx.merge(graphdef, state), weights.model_config, weights.tokenizer,
                weights.manifest)


if __name__ == "__main__":
  # `python -m ito_jax.export --workdir=DIR` is `python -m ito_jax.main export
  # --workdir=DIR`: the same flags, the same checks, the same message.
  import sys

  from ito_jax import cli
  from ito_jax import main as main_lib

  sys.argv.insert(1, "export")
  cli.run(main_lib.main)
