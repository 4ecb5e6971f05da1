"""Device mesh, logical-axis rules and input placement.

The mesh has axes ('data', 'fsdp', 'tensor'); a size of -1 means "the rest of
the devices". All axes are Auto so GSPMD propagates shardings from parameters
(annotated with logical names in the model) and from the batch, which is
split over data x fsdp.

Everything that can be wrong about a mesh (its size, the batch split, a
parameter dimension its axis does not divide) is reported here, naming the
config field, before the model is built or anything compiles.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  sizes = [config.mesh[a] for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for axis, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{axis}: must be positive or -1, got {s}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: fixed axes {dict(zip(MESH_AXES, sizes))} do not divide "
                       f"the {num_devices} devices")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


# Where a parameter's size comes from, for error messages: (tower, logical axis) -> field.
_TOWERS = {"image_tower": "model.image", "image_proj": "model.image", "text_tower": "model.text",
           "text_proj": "model.text", "fusion_head": "model.fusion"}
_SIZE_FIELDS = {"embed": "width", "heads": "num_heads", "mlp": "mlp_ratio", "kv": "width/num_heads"}


def _size_field(path, logical: str) -> str:
  if logical == "vocab":
    return "config.model.text.vocab_size"
  if logical == "joint":
    return "config.model.embed_dim"
  tower = _TOWERS.get(str(path[0]), "model")
  return f"config.{tower}.{_SIZE_FIELDS.get(logical, logical)}"


def check_divisible(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises ValueError if a parameter dimension is not divisible by the mesh
  axes its logical name maps to, naming the parameter, the size's config
  field and the mesh field, or if the rules put one mesh axis on two of its
  dimensions. Works on the abstract model: nothing is allocated."""
  from ito_jax.models.ito import ItoModel  # the model does not import this module

  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: ItoModel(config.model, rngs=nnx.Rngs(0)))
  rules = dict(logical_rules(config))
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    names = var.get_metadata().get("out_sharding") or ()
    used = {}  # mesh axis -> the logical name of the dimension already split over it
    for dim, (size, logical) in enumerate(zip(var.shape, names)):
      axes = rules.get(logical) if logical else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      for a in axes:
        if a in used:
          raise ValueError(
              f"config.logical_axis_rules: parameter {'/'.join(map(str, path))} has logical "
              f"axes {tuple(names)}, and {used[a]!r} and {logical!r} both map to mesh axis {a!r}; "
              f"one mesh axis can split only one dimension of a parameter")
        used[a] = logical
      shards = math.prod(mesh.shape[a] for a in axes)
      if size % shards:
        mesh_fields = " x ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(
            f"{_size_field(path, logical)}: parameter {'/'.join(map(str, path))} has size {size} "
            f"on dim {dim} (logical axis {logical!r}), not divisible by {mesh_fields} it is "
            f"sharded over (config.logical_axis_rules)")


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_rules(config: ml_collections.ConfigDict):
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.logical_axis_rules)


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` with its leading (batch) axis split over data x fsdp, when traced
  under a mesh of ours (`jax.set_mesh`, as the train step is); unchanged
  otherwise (evaluation, serving, tests without a mesh).

  Why: with every mesh axis Auto, GSPMD may meet a kernel split over fsdp by
  gathering the whole batch onto every device instead of the kernel, so fsdp
  would copy the activations it should split (several times the temporary
  memory of pure data parallelism). Pinning the activations between blocks
  leaves it only the kernel to gather, which is FSDP."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def split_microbatches(x: jax.Array, steps: int, mesh) -> jax.Array:
  """[B, ...] -> [steps, B / steps, ...]: microbatch j holds samples j,
  steps + j, 2 steps + j, ..., so each device's contiguous block of the batch
  gives every microbatch the same number of rows and none moves."""
  y = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
  if mesh is not None:
    y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))
  return y


def merge_microbatches(y: jax.Array, mesh) -> jax.Array:
  """The inverse of split_microbatches: samples back in batch order."""
  x = y.swapaxes(0, 1).reshape(-1, *y.shape[2:])
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
  return x


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh) -> dict:
  """Assembles global arrays from this process's part of the batch: each of
  the P processes holds 1 / P of it, as whole batch shards."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
    if out[k].shape[0] != v.shape[0] * jax.process_count():  # processes share batch shards
      raise ValueError(
          f"batch[{k!r}]: {jax.process_count()} processes x {v.shape[0]} local rows made a "
          f"global batch of {out[k].shape[0]}; each process must hold whole batch shards of "
          f"mesh {dict(mesh.shape)} (batch over {BATCH_AXES})")
  return out


def state_shardings(state):
  return jax.tree.map(lambda x: x.sharding, state)


def abstract_state_shardings(model_and_optimizer, mesh, config):
  """Shardings for an nnx state from its logical annotations (no allocation)."""
  with nnx.logical_axis_rules(logical_rules(config)):
    specs = nnx.get_partition_spec(nnx.state(model_and_optimizer))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
