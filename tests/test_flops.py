"""Analytic model FLOPs against XLA's cost analysis; MFU arithmetic; peak table;
bf16 compute keeps float32 parameters and optimizer state; the donate switch."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import common
from ito_jax import accumulation, bench, flops, objective, sharding, train


def tiny(width=64, batch=8):
  c = common.base_config()
  c.model.image.update(image_size=32, patch_size=8, width=width, depth=2, num_heads=2)
  c.model.text.update(vocab_size=64, context_length=16, width=width, depth=2, num_heads=2)
  c.model.embed_dim = 32
  c.batch_size = batch
  return c


def test_encoder_flops_by_hand():
  # L=4, W=8, F=32, one block: 8*4*64 + 4*16*8 + 4*4*8*32 = 2048 + 512 + 4096
  assert flops.encoder_forward_flops(4, 8, 1, 32) == 6656
  assert flops.encoder_forward_flops(4, 8, 3, 32) == 3 * 6656


def test_forward_parts_by_hand():
  c = tiny()
  parts = flops.forward_flops_per_example(c)
  assert parts["patch_embed"] == 2 * 16 * (8 * 8 * 3) * 64  # 16 patches of 8x8x3 -> 64
  assert parts["projections"] == 2 * 32 * (64 + 64)
  assert parts["logits"] == 2 * 8 * 32  # one row of the 8x8 similarity matrix
  c.loss.num_image_views = 2
  assert flops.forward_flops_per_example(c)["image_encoder"] == 2 * parts["image_encoder"]


def test_views_multiply_their_parts():
  """N text views embed N captions per example: text encoder and text
  projection N times, logits a row of the [B, B·N] matrix; V unaligned views
  embed V times the unaligned batch."""
  c = tiny()
  c.loss.num_text_views = 2
  parts = flops.forward_flops_per_example(c)
  # One text view, L=16, W=64, F=256, two blocks:
  # 2 * (8*16*64^2 + 4*16^2*64 + 4*16*64*256) = 2 * (524288 + 65536 + 1048576)
  assert parts["text_encoder"] == 2 * 3_276_800
  assert parts["logits"] == 2 * 8 * 2 * 32  # [B=8] x [N=2] columns of dim 32, 2 FLOPs each
  assert parts["projections"] == 2 * 32 * (64 + 2 * 64)  # one image view, two text views
  c = tiny()
  c.partial.enabled, c.loss.ot_weight = True, 1.0
  c.partial.unaligned_batch_size, c.partial.unaligned_views = 16, 1
  one = flops.forward_flops_per_example(c)["unaligned_towers"]
  c.partial.unaligned_views = 3
  assert flops.forward_flops_per_example(c)["unaligned_towers"] == 3 * one
  # Patch dropout (0.5: 8 of 16 tokens) reaches the unaligned images only
  # with partial.unaligned_patch_dropout: 2 unaligned images per example.
  c.partial.unaligned_views = 1
  c.model.image.patch_dropout = 0.5
  assert flops.forward_flops_per_example(c)["unaligned_towers"] == one
  c.partial.unaligned_patch_dropout = True
  saved = flops.encoder_forward_flops(16, 64, 2, 256) - flops.encoder_forward_flops(8, 64, 2, 256)
  assert flops.forward_flops_per_example(c)["unaligned_towers"] == one - 2 * saved


def test_conv_stem_flops_by_hand():
  c = tiny()
  c.model.image.stem = "conv"  # 32 px, patch 8: 3 -> 8 (16x16), 8 -> 16 (8x8), 16 -> 32 (4x4), 1x1 32 -> 64
  expected = 2 * 9 * (16 * 16 * 3 * 8 + 8 * 8 * 8 * 16 + 4 * 4 * 16 * 32) + 2 * 16 * 32 * 64
  assert flops.stem_forward_flops(c.model.image) == expected
  assert flops.forward_flops_per_example(c)["patch_embed"] == expected


@pytest.mark.parametrize("width,stem,patch_dropout", [(96, "patch", 0.0), (96, "conv", 0.0),
                                                     (96, "patch", 0.5)])
def test_analytic_count_matches_xla_cost_analysis(width, stem, patch_dropout):
  """Forward within 5%, and 3x forward against XLA's gradient within 5%: the
  uncounted elementwise work is a few percent at these widths. With patch
  dropout the image encoder runs on the kept tokens."""
  c = tiny(width)
  c.model.image.stem = stem
  c.model.image.patch_dropout = patch_dropout
  model, _ = train.create_model_and_optimizer(c, sharding.make_mesh(c))
  graphdef, state = nnx.split(model)
  batch = objective.with_patch_dropout(bench.random_batch(c), c, 0)
  loss = lambda s, b: objective.compute_loss(nnx.merge(graphdef, s), b, c)[0]
  fwd_xla = jax.jit(loss).lower(state, batch).compile().cost_analysis()["flops"]
  grad_xla = jax.jit(jax.grad(loss)).lower(state, batch).compile().cost_analysis()["flops"]
  fwd = sum(flops.forward_flops_per_example(c).values()) * c.batch_size
  assert fwd_xla / fwd == pytest.approx(1.0, abs=0.05)
  assert grad_xla / (3 * fwd) == pytest.approx(1.0, abs=0.05)
  assert flops.train_flops_per_example(c) == 3 * fwd / c.batch_size


@pytest.mark.parametrize("locked", [("image",), ("text",), ("image", "text")])
def test_a_locked_tower_counts_its_forward_pass_only(locked):
  """With a tower locked the gradient skips its backward pass: XLA's count of
  the step's gradient (accumulation.value_and_grad) is within 5% of the
  analytic 3x forward of the rest plus 1x forward of the locked tower."""
  c = tiny(96)
  c.optim.locked = locked
  model, _ = train.create_model_and_optimizer(c, sharding.make_mesh(c))
  graphdef, state = nnx.split(model)
  batch = bench.random_batch(c)
  step = lambda s, b: accumulation.value_and_grad(nnx.merge(graphdef, s), b, c)
  grad_xla = jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"]
  analytic = flops.train_flops_per_example(c) * c.batch_size
  assert grad_xla / analytic == pytest.approx(1.0, abs=0.05)
  c.optim.locked = ()
  assert flops.train_flops_per_example(c) * c.batch_size > analytic  # what locking saves


def test_peak_table():
  assert flops.peak_tflops("TPU v4") == 275.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v5p") == 459.0
  assert flops.peak_tflops("TPU v5") == 459.0
  assert flops.peak_tflops("TPU v6 lite") == 918.0
  assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.peak_tflops("NVIDIA H200") == 989.0
  assert flops.peak_tflops("cpu") is None


def test_mfu_arithmetic():
  c = tiny()
  per_example = flops.train_flops_per_example(c)
  step_s = per_example * c.batch_size / 1e12 / 2.0  # 2 TFLOP/s achieved
  f = flops.mfu_figures(c, step_s, "NVIDIA H100 80GB HBM3", num_devices=4,
                        xla_flops_per_step=per_example * c.batch_size / 4 * 1.1)
  assert f["model_tflops_per_s"] == pytest.approx(2.0)
  assert f["mfu_pct"] == pytest.approx(100 * 2.0 / (989.0 * 4))
  assert f["xla_over_model_flops"] == pytest.approx(1.1)
  g = flops.mfu_figures(c, step_s, "cpu", num_devices=1, peak=4.0)
  assert g["mfu_pct"] == pytest.approx(50.0)
  assert "n/a" in flops.mfu_figures(c, step_s, "cpu", num_devices=1)["mfu_pct"]
  with pytest.raises(ValueError, match="step_s"):
    flops.mfu_figures(c, 0.0, "cpu", 1)


def test_bf16_compute_keeps_f32_params_and_optimizer_state():
  c = tiny()
  c.model.dtype = "bfloat16"
  model, optimizer = train.create_model_and_optimizer(c, sharding.make_mesh(c))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  opt_dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
                if jnp.issubdtype(x.dtype, jnp.floating)}
  assert opt_dtypes == {jnp.dtype(jnp.float32)}
  _, tokens = model.image_tower(jnp.zeros((2, 32, 32, 3)))
  assert tokens.dtype == jnp.bfloat16


def test_donate_switch():
  c = tiny(width=32, batch=4)
  c.model.image.depth = c.model.text.depth = 1
  common.validate(c)
  step = bench.CompiledStep(c)
  old = jax.tree.leaves(step.state)[0]
  step.run(1)
  assert old.is_deleted()  # donated: the step reused its buffer
  c.model.donate = False
  step = bench.CompiledStep(c)
  old = jax.tree.leaves(step.state)[0]
  step.run(1)
  assert not old.is_deleted()


def test_partial_mode_counts_the_unaligned_towers():
  """R_ot's unaligned batches go through both towers every step: per aligned
  example, U·V/B images and texts more, and XLA's count agrees."""
  c = tiny(96)
  aligned = sum(flops.forward_flops_per_example(c).values())
  c.partial.enabled = True
  c.partial.unaligned_batch_size, c.partial.unaligned_views = 16, 1
  c.loss.ot_weight = 1.0
  parts = flops.forward_flops_per_example(c)
  patches, width = 16, 96
  one_image = (2 * patches * 8 * 8 * 3 * width + flops.encoder_forward_flops(patches, width, 2, 4 * width))
  one_text = flops.encoder_forward_flops(16, width, 2, 4 * width)
  assert parts["unaligned_towers"] == pytest.approx(16 / 8 * (one_image + one_text + 2 * 32 * 2 * width))
  model, _ = train.create_model_and_optimizer(c, sharding.make_mesh(c))
  graphdef, state = nnx.split(model)
  batch = bench.random_batch(c)
  loss = lambda s, b: objective.compute_loss(nnx.merge(graphdef, s), b, c)[0]
  fwd_xla = jax.jit(loss).lower(state, batch).compile().cost_analysis()["flops"]
  assert fwd_xla / (sum(parts.values()) * c.batch_size) == pytest.approx(1.0, abs=0.05)
  assert fwd_xla / (aligned * c.batch_size) > 2.5  # what leaving them out got wrong
  # Without R_ot (both weights 0) the objective never encodes them: not counted.
  c.loss.ot_weight = 0.0
  assert "unaligned_towers" not in flops.forward_flops_per_example(c)


def test_bench_times_the_step_with_r_ot_on():
  """The benchmarked state starts at step 0; a config whose R_ot starts later
  (ot.start_step) is timed as the steps after it run, R_ot included."""
  c = tiny(32)
  c.model.image.depth = c.model.text.depth = 1
  c.partial.enabled = True
  c.partial.unaligned_batch_size, c.partial.unaligned_views = 8, 1
  c.loss.ot_weight, c.ot.start_step = 1.0, 50
  step = bench.CompiledStep(c)
  assert step.config.ot.start_step == 0 and c.ot.start_step == 50  # the caller's config is kept
  _, metrics = step.compiled(step.state, step.batch)
  assert float(metrics["ot/weight"]) == 1.0 and float(metrics["loss/ot"]) != 0.0


def test_xla_undercounts_microbatched_towers_and_the_figures_say_so():
  """With optim.accumulation_steps the towers run in a lax.scan, whose body
  XLA's cost analysis counts once: its FLOPs fall far below the analytic
  3 x forward, and the MFU figures carry a note saying why."""
  c = tiny(96)
  c.optim.accumulation_steps = 4
  model, _ = train.create_model_and_optimizer(c, sharding.make_mesh(c))
  graphdef, state = nnx.split(model)
  step = lambda s, b: accumulation.value_and_grad(nnx.merge(graphdef, s), b, c)[1]
  xla = jax.jit(step).lower(state, bench.random_batch(c)).compile().cost_analysis()["flops"]
  analytic = flops.train_flops_per_example(c) * c.batch_size
  assert xla / analytic < 0.6  # one microbatch of 2 counted, of 8 samples
  note = flops.mfu_figures(c, 1.0, "cpu", 1, xla_flops_per_step=xla)["xla_flops_note"]
  assert "optim.accumulation_steps" in note and "scan_layers" not in note
  c.optim.accumulation_steps = 1
  assert "xla_flops_note" not in flops.mfu_figures(c, 1.0, "cpu", 1, xla_flops_per_step=xla)
  c.model.scan_layers = True
  assert "scan_layers" in flops.mfu_figures(c, 1.0, "cpu", 1, xla_flops_per_step=xla)["xla_flops_note"]
  c.model.scan_layers = False
  on_gpu = flops.mfu_figures(c, 1.0, "NVIDIA H200", 1, xla_flops_per_step=xla, platform="gpu")
  assert on_gpu["xla_flops_note"] == flops.GPU_NOTE


def test_the_train_step_drops_patches():
  """train.make_train_step applies model.image.patch_dropout: its compiled
  FLOPs fall with the rate as the analytic count does (4 of 16 tokens kept)."""
  counted = {}
  for rate in (0.0, 0.75):
    c = tiny(96)
    c.model.image.patch_dropout = rate
    mesh = sharding.make_mesh(c)
    graphdef, state = train.abstract_model_and_optimizer(c, mesh)
    step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, c)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
            for k, v in bench.random_batch(c).items()}
    xla = step.lower(state, spec).compile().cost_analysis()["flops"]
    counted[rate] = (xla, flops.train_flops_per_example(c))
  (xla0, analytic0), (xla1, analytic1) = counted[0.0], counted[0.75]
  assert analytic1 < 0.75 * analytic0
  assert xla1 / xla0 == pytest.approx(analytic1 / analytic0, abs=0.05)
