"""Where the work of a sharded step lands, on 8 simulated devices: the
patch-dropout draw and held-out embedding split over the batch axes as the
towers are, each device doing its share and nothing gathered that need not be.

The figures come from one subprocess (tests/sharded_step_check.py placement);
this process keeps its own single CPU device.
"""

from __future__ import annotations

import os

import pytest

from test_sharding import HERE, finish, start

pytestmark = pytest.mark.slow  # each test starts python processes


@pytest.fixture(scope="module")
def placement():
  """The JSON lines of sharded_step_check.py placement (about 20 s of CPU),
  one subprocess shared by the tests that read them."""
  return finish(start([os.path.join(HERE, "sharded_step_check.py"), "placement"], 8, True), 300)


def test_patch_dropout_draws_each_batch_shard_apart(placement):
  """The patch-dropout draw, compiled as the train step makes it, on every
  mesh: each device ranks its own rows' scores, so no collective runs, and the
  subsets are one device's. lax.top_k gathered the whole [B, M, patches] score
  array (and the unaligned images' too) onto every device, every step."""
  results = [r for r in placement if r["check"] == "patch_dropout"]
  assert [tuple(r["mesh"]) for r in results] == [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
  for r in results:
    assert r["collectives"] == [], (r["mesh"], r["scores_shape"], r["collectives"])
    assert all(r["equal_to_one_device"].values()), r
    rows = 32 // (r["mesh"][0] * r["mesh"][1])
    assert r["keep_shard_shapes"] == {"patch_keep": [rows, 2, 2], "unaligned_patch_keep": [rows, 1, 2]}


def test_evaluation_splits_its_batches_over_the_devices(placement):
  """Held-out embeddings of 21 examples in batches of 10 on every mesh: each
  batch padded to a multiple of data x fsdp and split over them, so a
  device's share of the compiled program is about 1 / (data x fsdp) of one
  device's per example (before, on data=8 every device embedded the whole
  batch: the same FLOPs as one device), and the embeddings are one device's."""
  results = [r for r in placement if r["check"] == "eval_embedding"]
  assert [tuple(r["mesh"]) for r in results] == [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
  for r in results:
    program, one = r["program"], r["one_device_program"]
    shards = r["mesh"][0] * r["mesh"][1]
    batch = -(-r["batch_size"] // shards) * shards  # 16 on 8 batch shards, 12 on 4
    print(f"eval embedding mesh {r['mesh']}: {program['flops_per_device'] / program['batch'][0]:.0f} "
          f"FLOPs per device per example, one device {one['flops_per_device'] / one['batch'][0]:.0f}")
    assert r["shapes"] == [[21, 16], [21, 16]]  # the padding rows dropped
    assert r["image_max_abs_diff"] <= 1e-6 and r["text_max_abs_diff"] <= 1e-6, r
    assert program["mesh_set"] and program["batch"][0] == batch
    assert program["shard_shape"] == [batch // shards, 8, 8, 3]
    per_example = program["flops_per_device"] / batch
    assert per_example <= 1.2 * one["flops_per_device"] / one["batch"][0] / shards, (r["mesh"], program, one)
