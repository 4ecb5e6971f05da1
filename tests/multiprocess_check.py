"""One process of a multi-process training run on 127.0.0.1; prints its losses as JSON.

  python tests/multiprocess_check.py --num_processes=2 --process_id=I --port=P [--accumulation_steps=2]
  python tests/multiprocess_check.py --num_processes=1

Every process sees the same deterministic global batches and feeds only its
own rows (process i of n: rows [i*B/n, (i+1)*B/n)), which
`sharding.put_batch` assembles into global arrays, as the data pipeline's
per-process shards are. With --num_processes=1 the whole batch goes to one
device: the reference trajectory. tests/test_sharding.py runs both and
compares. Held-out embeddings are computed as evaluation does: every process
holds the whole set, and each gets all of its embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 3


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--accumulation_steps", type=int, default=1)  # optim.accumulation_steps
  args = parser.parse_args()

  from ito_jax import distributed  # noqa: E402 (imports jax, touches no device)

  if args.num_processes > 1:
    distributed.initialize("auto", f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

  import jax
  from flax import nnx

  from configs import common
  from ito_jax import sharding, train
  from ito_jax.bench import random_batch
  from ito_jax.evaluate import evaluator
  from sharded_step_check import tiny_config

  config = tiny_config("ito")
  config.batch_size = 16
  config.loss.itm_negative_pool = 4  # the per-shard batch on 2 processes x 2 devices
  config.optim.accumulation_steps = args.accumulation_steps
  devices = jax.devices() if args.num_processes > 1 else jax.devices()[:1]
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (-1, 2, 1) if len(devices) > 1 else (1, 1, 1)
  common.validate(config, len(devices), jax.process_count())
  mesh = sharding.make_mesh(config, devices)
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, config)

  # Held-out embeddings as evaluation computes them (before training, which may
  # donate the parameters): every process holds all 13 examples; batches of 6
  # become 8 over the 4 batch shards of 2 processes, each process filling its own.
  held_out = random_batch(config, seed=9)
  embedded = {
      "image": evaluator.embed_in_batches(evaluator._embed_images, model, held_out["images"][:13, 0], 6),
      "text": evaluator.embed_in_batches(evaluator._embed_texts, model, held_out["tokens"][:13, 0], 6)}

  rows = config.batch_size // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  losses = []
  for i in range(STEPS):
    local = {k: v[mine] for k, v in random_batch(config, seed=i).items()}
    state, metrics = step(state, sharding.put_batch(local, mesh))
    losses.append(float(metrics["loss"]))
  # Bad-record counts as train.py logs them: each process names only the kinds it has seen.
  counts = {"data/records_read": 10 + jax.process_index(),
            f"data/bad/kind{jax.process_index()}": 1 + jax.process_index()}
  data_counts = distributed.sum_over_processes(counts)
  # A mesh whose batch shards span both processes (data=1, tensor=4; common.validate
  # refuses it): put_batch must refuse it too rather than build a half-size batch.
  shared_mesh_error = None
  if args.num_processes > 1:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, len(devices)
    try:
      sharding.put_batch({k: v[mine] for k, v in random_batch(config, seed=0).items()},
                         sharding.make_mesh(config, devices))
    except ValueError as e:
      shared_mesh_error = str(e)
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "devices": jax.device_count(), "mesh": dict(mesh.shape),
                    "accumulation_steps": config.optim.accumulation_steps, "losses": losses,
                    "data_counts": data_counts, "shared_mesh_error": shared_mesh_error,
                    "embeddings": {k: v.tolist() for k, v in embedded.items()}}),
        flush=True)
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
