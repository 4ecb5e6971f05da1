"""Where the work of a sharded step lands, on 8 simulated devices: the
patch-dropout draw splits over the batch axes as the towers do, each device
doing its share and nothing gathered that need not be.

The figures come from one subprocess (tests/sharded_step_check.py placement);
this process keeps its own single CPU device.
"""

from __future__ import annotations

import os

import pytest

from test_sharding import HERE, finish, start


@pytest.fixture(scope="module")
def placement():
  """The JSON lines of sharded_step_check.py placement, one subprocess
  shared by the tests that read them."""
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
