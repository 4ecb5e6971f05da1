"""Restores a 1-device checkpoint onto other meshes of this process's devices
and prints a JSON report (run with 2 CPU devices by test_checkpoint.py):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/mesh_restore_check.py WORKDIR DATA_DIR

For each mesh: every restored array equals its value restored onto one device,
carries the sharding the new mesh gives it (so Adam moments and kernels really
are split across devices), and the data iterator yields the same next batch.
The run's export, placed by init_from on the fsdp=2 mesh, equals params.npz.
It runs no multi-device program: XLA:CPU collectives can deadlock when a
2-core machine's thread pool is exhausted, which says nothing about restoring.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import tiny_run  # noqa: E402
from ito_jax import checkpoint, init_from, sharding, train  # noqa: E402
from ito_jax.data import pipeline  # noqa: E402
from ito_jax.export import flatten  # noqa: E402
from ito_jax.models.ito import encoder_filter  # noqa: E402


def restore(workdir, data_dir, mesh_sizes, devices):
  config = tiny_run.config(data_dir)
  config.mesh.update(mesh_sizes)
  mesh = sharding.make_mesh(config, devices)
  _, tokenizer = train.prepare_inputs(config, workdir)
  data = iter(pipeline.train_dataset(config, tokenizer, data_dir=data_dir))
  _, abstract = train.abstract_model_and_optimizer(config, mesh)
  state, step = checkpoint.Checkpointer(workdir, config, read_only=True).restore(abstract, data)
  return flatten(checkpoint.to_tree(state)), next(data), step


def main(workdir, data_dir):
  devices = jax.devices()
  base, base_batch, step = restore(workdir, data_dir, dict(data=1, fsdp=1, tensor=1), devices[:1])
  report = {"device_count": len(devices), "step": step, "meshes": {}}
  for name, sizes in {"fsdp=2": dict(data=1, fsdp=2, tensor=1),
                      "data=2": dict(data=2, fsdp=1, tensor=1)}.items():
    arrays, batch, restored_step = restore(workdir, data_dir, sizes, devices)
    split = [n for n, x in arrays.items()
             if len({str(s.index) for s in x.addressable_shards}) == len(devices)]
    report["meshes"][name] = {
        "step": restored_step,
        "names_equal": sorted(arrays) == sorted(base),
        "unequal": [n for n in base if not np.array_equal(np.asarray(arrays[n]), np.asarray(base[n]))],
        "devices": sorted({d.id for x in arrays.values() for d in x.sharding.device_set}),
        "split_arrays": len(split),
        "split_examples": sorted(split)[:3],
        "kernel_spec": str(arrays["model/image_proj/kernel"].sharding.spec),
        "adam_mu_spec": str(arrays["optimizer/opt_state/1/0/mu/image_proj/kernel"].sharding.spec),
        "next_batch_equal": all(np.array_equal(batch[k], base_batch[k]) for k in base_batch),
    }
  # The run's export placed by init_from on the fsdp=2 mesh: the values of
  # params.npz, split as the mesh splits them.
  config = tiny_run.config(data_dir)
  config.mesh.update(data=1, fsdp=2, tensor=1)
  config.init_from = os.path.join(workdir, "export")
  model, _ = train.create_model_and_optimizer(config, sharding.make_mesh(config, devices))
  weights = init_from.read(config)
  init_from.load_into(model, weights)
  placed = flatten(nnx.to_pure_dict(nnx.state(model, encoder_filter())))
  report["init_from"] = {
      "names_equal": sorted(placed) == sorted(weights.params),
      "unequal": [n for n in placed if not np.array_equal(np.asarray(placed[n]), weights.params[n])],
      "kernel_spec": str(placed["image_proj/kernel"].sharding.spec),
      "devices": sorted({d.id for x in placed.values() for d in x.sharding.device_set})}
  print(json.dumps(report))


if __name__ == "__main__":
  main(*sys.argv[1:3])
