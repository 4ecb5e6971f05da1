"""Starting a run from an export (`config.init_from`), e.g. to fine-tune on new
data or, with `optim.locked = ("image",)`, to tune a text tower against a
locked image tower (LiT).

`read` validates the export and checks that this config builds towers of the
same shapes before any data is generated; `load_into` places the export's
encoder parameters (towers, projections, temperature, bias) on the freshly
built, sharded model. The fusion head, which exports do not hold, keeps its
random initialisation, and the optimizer state starts empty as in any fresh
run. The run uses the export's tokenizer (`train.prepare_inputs`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from configs import common
from ito_jax import export
from ito_jax.models import ito

# Model fields that shape the encoder parameters, listed in the error when the
# shapes differ (the check itself compares every parameter).
SHAPE_FIELDS = ("embed_dim", "scan_layers", "image.image_size", "image.patch_size", "image.stem",
                "image.width", "image.depth", "image.num_heads", "image.mlp_ratio",
                "text.vocab_size", "text.context_length", "text.width", "text.depth",
                "text.num_heads", "text.mlp_ratio")


def _field(model_config: ml_collections.ConfigDict, dotted: str):
  node = model_config
  for key in dotted.split("."):
    node = node[key]
  return node


def read(config: ml_collections.ConfigDict) -> export.Weights:
  """The export `config.init_from` names, read to the host and checked against
  `config.model`; raises ConfigError naming init_from and what differs."""
  try:
    weights = export.read(config.init_from)
  except export.ExportError as e:
    raise common.ConfigError(f"config.init_from: {e}") from None
  # Shapes only: load_into casts to the config's parameter dtype.
  problems = export.param_differences(
      weights.params, export.flatten(export.abstract_encoder_params(config.model)), dtypes=False)
  if problems:
    fields = [f"model.{f} is {_field(weights.model_config, f)!r} in the export, "
              f"{_field(config.model, f)!r} here" for f in SHAPE_FIELDS
              if _field(weights.model_config, f) != _field(config.model, f)]
    raise common.ConfigError(
        f"config.init_from: the export {config.init_from} holds towers of other shapes than "
        f"this config builds ({'; '.join(fields) or 'see the parameters'}; {len(problems)} "
        f"parameters differ, e.g. {'; '.join(problems[:3])}). Set those model fields to the "
        f"export's (its model_config.json).")
  return weights


def load_into(model: ito.ItoModel, weights: export.Weights) -> None:
  """Replaces the model's encoder parameters with the export's, each cast to
  the model's parameter dtype and placed with the model's sharding (every
  process holds the whole array and fills its own devices' shards)."""
  state = nnx.state(model, ito.encoder_filter())
  current = nnx.to_pure_dict(state)

  def place(name, leaf):
    array = np.asarray(weights.params[name]).astype(leaf.dtype)
    return jax.make_array_from_callback(array.shape, leaf.sharding,
                                        lambda index, array=array: array[index])

  placed = {name: place(name, leaf) for name, leaf in export.flatten(current).items()}
  nnx.replace_by_pure_dict(state, export.unflatten_like(current, placed))
  nnx.update(model, state)
