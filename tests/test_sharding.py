"""Sharded training: per-shard loss terms, mesh validation, 8 devices, 2 processes.

This process keeps its own single CPU device. The checks that need 8 devices
or 2 processes run helper scripts in subprocesses (tests/sharded_step_check.py,
tests/multiprocess_check.py), each under a timeout and killed by its PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from flax import nnx

from configs import common
from ito_jax import distributed, objective, sharding
from ito_jax.bench import random_batch
from ito_jax.evaluate import gap
from ito_jax.losses import contrastive, sharded
from ito_jax.losses import fusion as fusion_losses
from ito_jax.models.ito import ItoModel
from sharded_step_check import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))


# =============================================================================
# One shard (axis=None) is the single-device objective
# =============================================================================
def test_single_shard_terms_equal_the_reference_losses():
  rng = np.random.default_rng(0)
  img, txt, anchor = unit(rng, 6, 2, 8), unit(rng, 6, 3, 8), unit(rng, 6, 8)
  scale, bias = jnp.float32(7.0), jnp.float32(-2.0)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  close(sharded.softmax_alignment(img, txt, scale, axis=None),
        contrastive.softmax_loss(img, txt, scale))
  close(sharded.sigmoid_alignment(img, txt, scale, bias, axis=None),
        contrastive.sigmoid_loss(img, txt, scale, bias))
  close(sharded.sigmoid_alignment_ring(img, txt, scale, bias, axis=None),
        contrastive.sigmoid_loss(img, txt, scale, bias))
  close(sharded.anchor_alignment(img[:, 0], txt[:, 0], anchor, scale, axis=None),
        fusion_losses.anchor_loss(img[:, 0], txt[:, 0], anchor, scale)[0])
  ours = sharded.saturation(img[:, 0], txt[:, 0], scale, axis=None)
  theirs = gap.saturation(scale * img[:, 0] @ txt[:, 0].T)
  for key in theirs:
    close(ours[key], theirs[key])


def test_ring_sigmoid_runs_in_float64():
  """Under x64 the ring's running sum is float64 like each step's, so the
  scan's carry types match and the value is the reference's to 1e-12."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    img = jnp.asarray(np.asarray(unit(rng, 5, 2, 4), np.float64))
    txt = jnp.asarray(np.asarray(unit(rng, 5, 1, 4), np.float64))
    scale, bias = jnp.float64(6.0), jnp.float64(-1.5)
    ours = sharded.sigmoid_alignment_ring(img, txt, scale, bias, axis=None)
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(ours, contrastive.sigmoid_loss(img, txt, scale, bias),
                               rtol=1e-12)


def test_mining_in_pools_is_mining_on_each_diagonal_block():
  rng = np.random.default_rng(1)
  sim = jnp.asarray(rng.normal(size=(6, 6)).astype(np.float32))
  whole = sharded.mine_in_pools(sim, 6)
  for ours, theirs in zip(whole, fusion_losses.mine_hard_negatives(sim)):
    np.testing.assert_array_equal(ours, theirs)
  neg_text, neg_image = sharded.mine_in_pools(sim, 3)
  for start in (0, 3):
    block = sim[start:start + 3, start:start + 3]
    text, image = fusion_losses.mine_hard_negatives(block)
    np.testing.assert_array_equal(neg_text[start:start + 3], np.asarray(text) + start)
    np.testing.assert_array_equal(neg_image[start:start + 3], np.asarray(image) + start)


@pytest.mark.parametrize("pool", [1, 3])
def test_mining_in_pools_refuses_a_pool_that_leaves_a_sample_only_itself(pool):
  """A pool of 1, or one that does not divide the shard (the last pool of 4
  samples in 3s holds one), would make a sample its own hard negative."""
  sim = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
  with pytest.raises(ValueError, match=f"pool of {pool} samples must be >= 2 and divide"):
    sharded.mine_in_pools(sim, pool)


def test_objective_without_mesh_equals_the_unsharded_formulation():
  """compute_loss (per-shard terms on one shard, ITM pairs stacked per sample)
  equals the objective assembled from the plain [B, B] losses, and its batch
  gap metric is the evaluator's centroid distance over every view."""
  config = tiny_config("ito")
  config.batch_size = 6
  config.loss.itm_negative_pool = 0  # the whole batch, as fusion.itm_loss mines
  with nnx.use_eager_sharding(False):
    model = ItoModel(config.model, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in random_batch(config).items()}

  @nnx.jit
  def both(model, batch):  # one compiled program: eager op-by-op is slow
    loss, metrics = objective.compute_loss(model, batch, config)
    out = objective.embed_batch(model, batch)
    scale, head = model.logit_scale, model.fusion_head
    img0, txt0 = out["image_emb"][:, 0], out["text_emb"][:, 0]
    align = contrastive.softmax_loss(out["image_emb"], out["text_emb"], scale)
    itm, _ = fusion_losses.itm_loss(head, out["text_tokens"], out["text_mask"],
                                    out["image_tokens"], scale * img0 @ txt0.T)
    fused = head(out["text_tokens"], out["text_mask"], out["image_tokens"])
    anchor, _ = fusion_losses.anchor_loss(img0, txt0, head.anchor(fused), scale,
                                          pull_weight=config.loss.anchor_pull_weight)
    return loss, metrics, align, itm, anchor, out["image_emb"], out["text_emb"]

  loss, metrics, align, itm, anchor, image_emb, text_emb = both(model, batch)
  np.testing.assert_allclose(metrics["loss/align"], align, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/itm"], itm, rtol=1e-6)
  np.testing.assert_allclose(
      metrics["loss/anchor"] + config.loss.anchor_pull_weight * metrics["fusion/anchor_pull"],
      anchor, rtol=1e-6)
  np.testing.assert_allclose(loss, align + 0.5 * itm + 0.5 * anchor, rtol=1e-6)
  dim = image_emb.shape[-1]
  np.testing.assert_allclose(
      metrics["gap/batch_centroid_distance"],
      gap.centroid_distance(np.asarray(image_emb).reshape(-1, dim),
                            np.asarray(text_emb).reshape(-1, dim)), rtol=1e-5)


# =============================================================================
# Mesh and config errors, before anything is built
# =============================================================================
@pytest.mark.parametrize("update,devices,match", [
    (dict(mesh=dict(data=3, fsdp=1, tensor=1)), 8, r"config.mesh: \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices, but 8"),
    (dict(mesh=dict(data=-1, fsdp=3, tensor=1)), 8, "config.mesh: fixed axes .* do not divide the 8 devices"),
    (dict(batch_size=36, mesh=dict(data=2, fsdp=4, tensor=1)), 8, r"config.batch_size: 36 is not divisible by the 8 batch shards \(config.mesh.data x config.mesh.fsdp = 2 x 4"),
    (dict(loss=dict(sharded=False, sigmoid_variant="ring")), 8, "config.loss.sigmoid_variant: 'ring' .* needs loss.sharded"),
    (dict(loss=dict(itm_negative_pool=3)), 8, "config.loss.itm_negative_pool: ITM negatives are mined within pools of 3 samples, which must be >= 2 and divide the 4 samples"),
    (dict(loss=dict(itm_negative_pool=0)), 32, "config.loss.itm_negative_pool: .* pools of 1 samples"),
    (dict(logical_axis_rules=(("embed", "model"),)), 8, "config.logical_axis_rules: rule .* names a mesh axis outside"),
    (dict(logical_axis_rules=(("batch", "data"),)), 8, r"config.logical_axis_rules: rule \('batch', 'data'\): the batch is always split over \('data', 'fsdp'\)"),
    (dict(seed=-1), 8, "config.seed: must be a non-negative integer, got -1"),
    (dict(data=dict(seed=-2)), 8, "config.data.seed: must be a non-negative integer, got -2"),
])
def test_invalid_mesh_settings_name_the_field(update, devices, match):
  config = tiny_config("ito")  # batch 32, ITM pools of 4
  config.mesh.data = -1
  for key, value in update.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(common.ConfigError, match=match):
    common.validate(config, num_devices=devices)


@pytest.mark.parametrize("field,value,mesh_shape,match", [
    ("model.image.width", 18, (2, 4, 1), "config.model.image.width: parameter image_(tower|proj)/.* has size 18 .*logical axis 'embed'.* config.mesh.fsdp=4"),
    ("model.text.num_heads", 1, (2, 2, 2), "config.model.text.num_heads: parameter text_tower/.*logical axis 'heads'.* config.mesh.tensor=2"),
    ("model.text.vocab_size", 63, (2, 2, 2), "config.model.text.vocab_size: .*config.mesh.tensor=2"),
])
def test_parameter_not_divisible_by_its_mesh_axis(field, value, mesh_shape, match):
  config = tiny_config("ito")
  section, _, name = field.rpartition(".")
  config.model[section.split(".")[1]][name] = value
  mesh = jax.sharding.AbstractMesh(mesh_shape, sharding.MESH_AXES)
  with pytest.raises(ValueError, match=match):
    sharding.check_divisible(config, mesh)
  sharding.check_divisible(tiny_config("ito"), mesh)  # the unchanged config fits


def test_a_dimension_split_over_two_mesh_axes_must_divide_their_product():
  """A rule mlp -> (fsdp, tensor) shards the MLP dimension fsdp x tensor ways:
  mlp 20 divides fsdp=4 alone but not 4 x 2, and the error names both."""
  config = tiny_config("softmax")
  config.logical_axis_rules = tuple((k, ("fsdp", "tensor")) if k == "mlp" else (k, v)
                                    for k, v in config.logical_axis_rules)
  config.model.image.mlp_ratio = 1.25  # image width 16 -> mlp 20
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"size 20 .*config.mesh.fsdp=4 x config.mesh.tensor=2"):
    sharding.check_divisible(config, mesh)


def test_every_process_must_feed_whole_batch_shards():
  """Each process reads batch_size / P rows of its own: with the batch split
  over fewer shards than there are processes (tensor across hosts) the global
  batch would be a fraction of batch_size, different on every process."""
  config = tiny_config("ito")
  config.mesh.update(data=1, fsdp=1, tensor=4)
  with pytest.raises(common.ConfigError, match=r"config.mesh: the batch is split over "
                     r"config.mesh.data x config.mesh.fsdp = 1 x 1 = 1 shards, which the 2 processes"):
    common.validate(config, num_devices=4, num_processes=2)
  common.validate(config, num_devices=4, num_processes=1)  # one process holds the whole batch
  config.mesh.update(data=2, tensor=2)
  common.validate(config, num_devices=4, num_processes=2)  # one batch shard per process


def test_one_mesh_axis_on_two_dimensions_of_a_parameter_is_named():
  """kv -> tensor next to heads -> tensor would split an attention kernel
  [embed, heads, kv] over 'tensor' twice; check_divisible says so before the
  model is built, naming the rule set and both logical axes."""
  config = tiny_config("ito")
  config.logical_axis_rules = tuple((k, "tensor") if k == "kv" else (k, v)
                                    for k, v in config.logical_axis_rules)
  mesh = jax.sharding.AbstractMesh((1, 1, 2), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"config.logical_axis_rules: parameter .*'heads' and 'kv' "
                     r"both map to mesh axis 'tensor'"):
    sharding.check_divisible(config, mesh)


def test_explicit_coordinator_keeps_every_local_device_inside_an_srun_step(tmp_path):
  """The Slurm launcher runs one process per node with an explicit coordinator.
  Inside srun, JAX's cluster detection would restrict the process to GPU
  SLURM_LOCALID (here 0); it must keep all of them. A one-process job on
  127.0.0.1, in a subprocess so this one's runtime stays uninitialised."""
  port = portpicker.pick_unused_port()
  script = ("import sys, jax; from ito_jax import distributed; "
            f"distributed.initialize('auto', '127.0.0.1:{port}', 1, 0); "
            "print('visible', jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()")
  env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu01", "SLURM_NTASKS": "1",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "visible all" in out.stdout, out.stdout


def test_distributed_start_up_decisions(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "SLURM_JOB_ID",
              "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.multi_process_environment() is None
  assert distributed.initialize("auto") is False  # a plain single process starts nothing
  assert distributed.initialize("off", "127.0.0.1:1", 2, 0) is False
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("auto", "127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="--process_id must be in"):
    distributed.initialize("auto", "127.0.0.1:1234", 2, 2)
  # An sbatch script with --ntasks=4 runs once, as task 0, outside any srun
  # step: one process, which must not wait for three others.
  for var, value in (("SLURM_JOB_ID", "123"), ("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0"),
                     ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(var, value)
  assert distributed.multi_process_environment() is None
  monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu01")  # inside `srun`: four tasks
  assert distributed.multi_process_environment() == "Slurm"
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task srun step is still one process
  assert distributed.multi_process_environment() is None
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.multi_process_environment() == "Slurm"
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST"):
    monkeypatch.delenv(var)
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
  assert distributed.multi_process_environment() == "Open MPI"


def test_a_launcher_jax_cannot_read_gets_an_error_that_says_what_to_pass():
  """Open MPI 5 sets OMPI_COMM_WORLD_SIZE but not the ORTE URI JAX reads:
  jax.distributed's bare 'coordinator_address should be defined' becomes an
  error naming the launcher and the flags that work (in a fresh process, so
  this one's JAX runtime is untouched)."""
  code = ("from ito_jax import distributed\n"
          "try:\n  distributed.initialize('auto')\nexcept ValueError as e:\n  print('ERROR', e)\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
  env.update(OMPI_COMM_WORLD_SIZE="4", JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE))
  out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE), env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ERROR --distributed=auto: Open MPI shows several processes, but jax.distributed could not" \
      in out.stdout, out.stdout
  assert "--coordinator_address, --num_processes and --process_id" in out.stdout


# =============================================================================
# Subprocesses: 8 simulated devices, 2 processes on loopback
# =============================================================================
def start(args, devices: int, fast_compile: bool = False):
  """fast_compile: skip LLVM optimisation (about 40% less CPU for these tiny
  programs); the SPMD partitioning under test is the same."""
  flags = f"--xla_force_host_platform_device_count={devices}"
  if fast_compile:
    flags += " --xla_backend_optimization_level=0"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, *args], cwd=os.path.dirname(HERE), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout: float) -> list[dict]:
  """Waits for proc (killed by its PID on timeout or error); its JSON lines."""
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_sharded_loss_holds_no_global_bxb_buffer():
  """B = 4096, dim 64, 8 devices: a float32 [B, B] is 64 MiB, a device's
  [B/8, B] rows 8 MiB. Value and gradient of alignment + saturation + anchor.
  The same subprocess checks the saturation metric's values on 8 shards."""
  results = finish(start([os.path.join(HERE, "sharded_step_check.py"), "memory"], 8), 300)
  (fsdp,) = [r for r in results if r["check"] == "fsdp_memory"]
  # The same process checks the saturation metric's values on 8 shards: each
  # shard's positives are its own columns of the gathered texts.
  (saturation,) = [r for r in results if r["check"] == "saturation"]
  print(f"saturation on 8 shards {saturation['sharded']}, whole batch {saturation['whole']}")
  assert 0 < saturation["whole"]["frac_positive_prob_gt_099"] < 1  # neither statistic is trivial
  assert saturation["whole"]["mean_margin"] > 1
  for key, value in saturation["whole"].items():
    assert saturation["sharded"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  results = [r for r in results if r["check"] == "memory"]
  assert len(results) == 3
  # FSDP splits the activations over the batch as data parallelism does:
  # without the model's batch constraints it gathered the batch (69.5 against
  # 37.6 MiB here), with them it needs no more than data parallelism.
  temp = fsdp["temp_mib"]
  print(f"train step temp per device: data=8 {temp['data']:.1f} MiB, fsdp=8 {temp['fsdp']:.1f} MiB")
  assert temp["fsdp"] <= 1.1 * temp["data"], temp
  for r in results:
    batch, local = r["batch"], r["batch"] // r["devices"]
    print(f"memory {r['loss']}/{r['variant']}: per-device temp {r['sharded']['temp_mib']:.1f} MiB "
          f"(alignment alone {r['sharded']['align_temp_mib']:.1f}), largest array "
          f"{r['sharded']['largest_array']}; one device {r['one_device']['temp_mib']:.1f} MiB, "
          f"largest {r['one_device']['largest_array']}; [B, B] = {r['global_bxb_mib']:.0f} MiB")
    assert r["one_device"]["largest_array"] == [batch, batch]  # the check can see a [B, B]
    assert np.prod(r["sharded"]["largest_array"]) <= local * batch
    assert r["sharded"]["temp_mib"] < r["one_device"]["temp_mib"] / 4
    assert r["sharded"]["align_temp_mib"] < r["global_bxb_mib"]
  ring = next(r for r in results if r["variant"] == "ring")
  assert np.prod(ring["sharded"]["align_largest_array"]) <= local * local * 4  # [b, b] blocks only


# The 8-device step check in three processes, so that test workers can share them out.
STEP_CHECK_PARTS = (("softmax", "sigmoid_gather", "sigmoid_ring"), ("ito",), ("ot_partial",))


def test_the_step_check_parts_cover_every_objective():
  """An objective added to sharded_step_check.py must be checked by some part."""
  import sharded_step_check

  parts = [o for part in STEP_CHECK_PARTS for o in part]
  assert sorted(parts) == sorted(sharded_step_check.OBJECTIVES)


@pytest.mark.slow
@pytest.mark.parametrize("objectives", STEP_CHECK_PARTS, ids=lambda o: "+".join(o))
def test_sharded_step_equals_single_device_step(objectives):
  """(8,1,1), (2,4,1), (2,2,2) x softmax, sigmoid gather, sigmoid ring, ITO
  (fusion, ITM and anchor, M = N = 2, patch dropout 0.5): two steps from the
  same parameters;
  and (2,2,2) with optim.accumulation_steps = 2 (gradient caching over two
  strided microbatches, each split over the 4 batch shards), also in partial
  mode with R_ot, whose unaligned batches are microbatched the same way."""
  # About 100 s of CPU in all; the timeout leaves room for cores shared with other jobs.
  results = finish(start([os.path.join(HERE, "sharded_step_check.py"), "step", *objectives], 8, True),
                   900)
  every_mesh = (((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((2, 2, 2), 2))
  assert {(r["objective"], tuple(r["mesh"]), r["accumulation_steps"]) for r in results} == {
      (o, m, a) for o in objectives
      for m, a in (every_mesh if o != "ot_partial" else (((2, 2, 2), 2),))}
  for r in results:
    print(f"step {r['objective']:>14} mesh {r['mesh']} x{r['accumulation_steps']}: losses {r['losses']} vs "
          f"{r['reference_losses']}, |d loss| {r['loss_max_abs_diff']:.2e}, "
          f"|d param| {r['param_max_abs_diff']:.2e} (largest update {r['param_max_update']:.2e})")
    # Losses of ~20 (sigmoid sums over a row) carry float32 rounding of ~1e-6 relative.
    assert r["loss_max_abs_diff"] <= 1e-5 * max(1.0, max(map(abs, r["reference_losses"])))
    assert r["param_max_abs_diff"] <= 1e-5
    # The ViT MLP kernel [16, 32] ('embed', 'mlp'): split over fsdp and tensor on each
    # device, after the step, in the parameter and both Adam moments.
    _, fsdp, tensor = r["mesh"]
    shapes = r["fc1_kernel_shard_shapes"]
    assert len(shapes) == 3 and all(v == [16 // fsdp, 32 // tensor] for v in shapes.values()), shapes


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory():
  """ITO (with patch dropout) on 2 processes x 2 devices, the towers in two
  microbatches there (optim.accumulation_steps = 2, each microbatch drawing
  rows from both processes), against one process, one device, one pass;
  and the bad-record counts that train.py logs, summed over the processes;
  and held-out embeddings, their batches split over both processes' devices,
  whole on each process and equal to one device's."""
  port = portpicker.pick_unused_port()
  script = os.path.join(HERE, "multiprocess_check.py")
  workers = [start([script, "--num_processes=2", f"--process_id={i}", f"--port={port}",
                    "--accumulation_steps=2"], 2, True)
             for i in range(2)]
  try:
    results = [finish(proc, 600)[0] for proc in workers]
  finally:
    for proc in workers:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  reference = finish(start([script, "--num_processes=1"], 1, True), 600)[0]
  print(f"2 processes x 2 devices, mesh {results[0]['mesh']}: {results[0]['losses']}; "
        f"1 process, 1 device: {reference['losses']}")
  assert [r["process_count"] for r in results] == [2, 2]
  assert [r["devices"] for r in results] == [4, 4]
  assert [r["accumulation_steps"] for r in results + [reference]] == [2, 2, 1]
  assert results[0]["losses"] == results[1]["losses"]  # one global computation
  # Logged bad-record counts add up every process's shard, kinds seen by either.
  both = {"data/records_read": 21, "data/bad/kind0": 1, "data/bad/kind1": 2}
  assert [r["data_counts"] for r in results] == [both, both]
  assert reference["data_counts"] == {"data/records_read": 10, "data/bad/kind0": 1}
  # put_batch refuses a mesh whose batch shards the processes share, naming the sizes.
  assert all("2 processes x 8 local rows made a global batch of 8" in r["shared_mesh_error"]
             for r in results), [r["shared_mesh_error"] for r in results]
  np.testing.assert_allclose(results[0]["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
  # Held-out embeddings split over both processes' devices come back whole to each.
  assert results[0]["embeddings"] == results[1]["embeddings"]
  for key in ("image", "text"):
    assert np.shape(reference["embeddings"][key]) == (13, 16)
    np.testing.assert_allclose(results[0]["embeddings"][key], reference["embeddings"][key], atol=1e-6)
  assert reference["losses"][-1] < reference["losses"][0]  # it trains
