"""FusionHead and the two L_fuse losses (ITM, fused anchor)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ito_jax.losses import fusion as fusion_loss
from ito_jax.models.fusion import FusionHead

B, T, P = 4, 6, 5  # batch, text tokens, image patches
DT, DV, W, E = 12, 10, 16, 8  # text width, image width, head width, embed dim
LOGICAL_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'joint', None}


def make_head(depth=2, seed=0):
  return FusionHead(text_width=DT, image_width=DV, width=W, depth=depth,
                    num_heads=4, mlp_ratio=2.0, embed_dim=E, rngs=nnx.Rngs(seed))


@nnx.jit
def fuse(model, text, mask, image):
  return model(text, mask, image)


@nnx.jit
def match_logits(model, text, mask, image):
  return model.match_logit(model(text, mask, image))


@pytest.fixture(scope='module')
def head():
  with nnx.use_eager_sharding(False):
    return make_head()


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  text = rng.normal(size=(B, T, DT)).astype(np.float32)
  image = rng.normal(size=(B, P, DV)).astype(np.float32)
  lengths = np.array([6, 3, 1, 4])
  mask = np.arange(T)[None, :] < lengths[:, None]  # [B, T]
  sim = rng.normal(size=(B, B)).astype(np.float32)
  return jnp.asarray(text), jnp.asarray(mask), jnp.asarray(image), jnp.asarray(sim)


# ---------------------------------------------------------------- head --------


def _zero(linear):
  linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
  linear.bias[...] = jnp.zeros_like(linear.bias[...])


def test_cross_block_residuals_and_image_norm():
  """CrossAttentionBlock adds its branches to the text stream: with
  attention.out and mlp_out zeroed it returns the text unchanged. The image
  is read through norm_image, so scaling it by 4 changes nothing, while a
  different image does change the output."""
  from ito_jax.models.fusion import CrossAttentionBlock

  def block():
    with nnx.use_eager_sharding(False):
      return CrossAttentionBlock(width=W, num_heads=4, mlp_ratio=2.0, dtype=jnp.float32,
                                 param_dtype=jnp.float32, rngs=nnx.Rngs(0))

  rng = np.random.default_rng(1)
  text = jnp.asarray(rng.normal(size=(2, T, W)), jnp.float32)  # [batch, text tokens, width]
  image = jnp.asarray(rng.normal(size=(2, P, W)), jnp.float32)  # [batch, patches, width]
  off = block()
  _zero(off.attention.out)
  _zero(off.mlp_out)
  np.testing.assert_allclose(off(text, image), text, atol=1e-6)
  b = block()
  out = b(text, image)
  assert float(jnp.abs(out - b(text, image[:, ::-1] ** 2)).max()) > 1e-3
  np.testing.assert_allclose(b(text, 4.0 * image), out, atol=1e-4)


def test_output_shapes_and_unit_anchor(head, batch):
  text, mask, image, _ = batch
  fused = fuse(head, text, mask, image)
  assert fused.shape == (B, W)
  assert nnx.jit(lambda m, f: m.match_logit(f))(head, fused).shape == (B,)
  anchor = nnx.jit(lambda m, f: m.anchor(f))(head, fused)
  assert anchor.shape == (B, E)
  np.testing.assert_allclose(np.linalg.norm(anchor, axis=-1), 1.0, rtol=1e-5)


def test_params_carry_logical_axis_names(head):
  for path, param in nnx.state(head, nnx.Param).flat_state():
    names = param.get_metadata()['out_sharding']
    assert len(names) == param.ndim, path
    assert set(names) <= LOGICAL_AXES, (path, names)
    named = [n for n in names if n is not None]
    assert len(named) == len(set(named)), (path, names)  # no axis named twice


def test_builds_sharded_under_mesh_and_logical_rules():
  """Under a mesh, the logical names map onto mesh axes (abstract build, no FLOPs)."""
  mesh = jax.make_mesh((1, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('embed', 'data'), ('mlp', 'model'), ('heads', 'model'),
           ('kv', None), ('joint', None))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: make_head(depth=1))
  spec = lambda var: var.get_value().sharding.spec
  P = jax.sharding.PartitionSpec
  assert spec(abstract.blocks[0].mlp_in.kernel) == P('data', 'model')
  assert spec(abstract.blocks[0].attention.query.kernel) == P('data', 'model', None)
  assert spec(abstract.anchor_proj.kernel) == P('data', None)


def test_padded_text_tokens_do_not_change_fused_vector(head, batch):
  text, mask, image, _ = batch
  fused = fuse(head, text, mask, image)
  noise = jax.random.normal(jax.random.key(1), text.shape) * 100.0
  noisy = jnp.where(mask[..., None], text, noise)
  np.testing.assert_allclose(fuse(head, noisy, mask, image), fused, atol=1e-6)
  nan_padded = jnp.where(mask[..., None], text, jnp.nan)
  np.testing.assert_allclose(fuse(head, nan_padded, mask, image), fused, atol=1e-6)
  # ... whereas a valid token does change it (the mask is not hiding everything).
  changed = text.at[:, 0].add(1.0)
  assert np.all(np.abs(fuse(head, changed, mask, image) - fused).max(axis=-1) > 1e-4)


def test_pooling_equals_head_on_truncated_text(head, batch):
  """Row i of a padded batch equals the head run on its valid tokens alone."""
  text, mask, image, _ = batch
  fused = fuse(head, text, mask, image)
  for i in range(B):
    length = int(mask[i].sum())
    alone = fuse(head, text[i:i + 1, :length], jnp.ones((1, length), bool),
                 image[i:i + 1])
    np.testing.assert_allclose(alone[0], fused[i], atol=1e-5)


# ------------------------------------------------------------- mining ---------


def test_hard_negatives_are_argmax_off_diagonal():
  rng = np.random.default_rng(3)
  sim = rng.normal(size=(5, 5)).astype(np.float32)
  sim[np.diag_indices(5)] += 10.0  # positives are the largest: must be skipped
  neg_text, neg_image = jax.jit(fusion_loss.mine_hard_negatives)(jnp.asarray(sim))
  off = np.where(np.eye(5, dtype=bool), -np.inf, sim)
  np.testing.assert_array_equal(neg_text, off.argmax(axis=1))
  np.testing.assert_array_equal(neg_image, off.argmax(axis=0))
  assert np.all(np.asarray(neg_text) != np.arange(5))
  assert np.all(np.asarray(neg_image) != np.arange(5))


def test_hard_negative_mining_needs_two_samples():
  with pytest.raises(ValueError, match='at least 2'):
    jax.jit(fusion_loss.mine_hard_negatives)(jnp.zeros((1, 1)))


# ------------------------------------------------------------- ITM loss -------


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_itm_loss_from_logits_matches_numpy():
  pos = np.array([2.0, -0.5, 0.3], np.float32)
  neg = np.array([-1.0, 0.7, -3.0, 0.2, -0.1, 1.5], np.float32)
  loss, aux = fusion_loss.itm_loss_from_logits(jnp.asarray(pos), jnp.asarray(neg))
  expected = 0.5 * (-_np_log_sigmoid(pos).mean()
                    - _np_log_sigmoid(-neg).mean())
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # positives right: 2/3; negatives right (logit <= 0): 3/6.
  np.testing.assert_allclose(aux['itm_accuracy'], 0.5 * (2 / 3 + 3 / 6), rtol=1e-6)


def test_itm_loss_scores_true_pairs_and_mined_negatives(head, batch):
  """itm_loss == the balanced BCE of the head's logits on the right 3B pairs."""
  text, mask, image, sim = batch
  loss, aux = nnx.jit(fusion_loss.itm_loss)(head, text, mask, image, sim)
  off = np.where(np.eye(B, dtype=bool), -np.inf, np.asarray(sim))
  neg_text, neg_image = off.argmax(axis=1), off.argmax(axis=0)

  def logit(ti, ii):
    return match_logits(head, text[ti][None], mask[ti][None], image[ii][None])[0]

  pos = np.array([logit(i, i) for i in range(B)])
  neg = np.array([logit(neg_text[i], i) for i in range(B)]
                 + [logit(j, neg_image[j]) for j in range(B)])
  expected, expected_aux = fusion_loss.itm_loss_from_logits(
      jnp.asarray(pos), jnp.asarray(neg))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux['itm_accuracy'], expected_aux['itm_accuracy'])


def _grad_norms(grads):
  return {'/'.join(map(str, p)): float(jnp.linalg.norm(v[...]))
          for p, v in grads.flat_state()}


def test_itm_loss_gradients_reach_tokens_and_head(head, batch):
  text, mask, image, sim = batch

  def loss_fn(model, text, image, sim):
    return fusion_loss.itm_loss(model, text, mask, image, sim)[0]

  g_head, g_text, g_image, g_sim = nnx.jit(
      nnx.grad(loss_fn, argnums=(0, 1, 2, 3)))(head, text, image, sim)
  valid = np.asarray(mask)
  assert np.all(np.abs(g_text).sum(-1)[valid] > 0)  # every valid text token
  np.testing.assert_array_equal(np.asarray(g_text)[~valid], 0.0)  # no padding
  assert np.all(np.abs(g_image).sum(-1) > 0)  # every image patch
  np.testing.assert_array_equal(g_sim, 0.0)  # mining is stop-gradient
  norms = _grad_norms(g_head)
  assert all(np.isfinite(v) for v in norms.values())
  for name in ('match_head/kernel', 'text_in/kernel', 'image_in/kernel',
               'blocks/0/attention/query/kernel', 'blocks/1/mlp_in/kernel'):
    assert norms[name] > 0, name
  assert norms['anchor_proj/kernel'] == 0  # not used by ITM


# ----------------------------------------------------------- anchor loss ------


def _np_symmetric_info_nce(logits):
  def xent_rows(x):
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return (lse - np.diag(x)).mean()
  return 0.5 * (xent_rows(logits) + xent_rows(logits.T))


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_anchor_loss_matches_numpy():
  rng = np.random.default_rng(5)
  img, txt, anc = (_unit_rows(rng, 5, E) for _ in range(3))
  scale = 7.5
  loss, aux = fusion_loss.anchor_loss(
      *(jnp.asarray(a, jnp.float32) for a in (img, txt, anc)), scale)
  li = _np_symmetric_info_nce(scale * img @ anc.T)
  lt = _np_symmetric_info_nce(scale * txt @ anc.T)
  np.testing.assert_allclose(aux['anchor_image_loss'], li, rtol=1e-5)
  np.testing.assert_allclose(aux['anchor_text_loss'], lt, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * (li + lt), rtol=1e-5)
  pull = 0.5 * ((1 - np.sum(img * anc, 1)).mean() + (1 - np.sum(txt * anc, 1)).mean())
  with_pull, aux = fusion_loss.anchor_loss(
      *(jnp.asarray(a, jnp.float32) for a in (img, txt, anc)), scale, pull_weight=2.0)
  np.testing.assert_allclose(aux['anchor_pull'], pull, rtol=1e-5)
  np.testing.assert_allclose(with_pull, 0.5 * (li + lt) + 2.0 * pull, rtol=1e-5)


def test_anchor_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    args = [jnp.asarray(_unit_rows(rng, 4, E)) for _ in range(3)]
    args.append(jnp.asarray(3.0))

    @jax.jit
    def f(*a):
      return fusion_loss.anchor_loss(*a, pull_weight=0.7)[0]

    assert f(*args).dtype == jnp.float64  # float64 in, float64 math
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args)
    eps = 1e-5
    for k in range(4):
      direction = jnp.asarray(rng.normal(size=np.shape(args[k])))
      plus = list(args)
      minus = list(args)
      plus[k] = args[k] + eps * direction
      minus[k] = args[k] - eps * direction
      numeric = (f(*plus) - f(*minus)) / (2 * eps)
      analytic = jnp.sum(grads[k] * direction)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_anchor_loss_gradients_reach_tokens_and_head(head, batch):
  text, mask, image, _ = batch
  rng = np.random.default_rng(7)
  img_emb, txt_emb = (jnp.asarray(_unit_rows(rng, B, E), jnp.float32)
                      for _ in range(2))

  def loss_fn(model, text, image, img_emb, txt_emb):
    anchor = model.anchor(model(text, mask, image))
    return fusion_loss.anchor_loss(img_emb, txt_emb, anchor, 10.0)[0]

  g_head, g_text, g_image, g_img, g_txt = nnx.jit(nnx.grad(
      loss_fn, argnums=(0, 1, 2, 3, 4)))(head, text, image, img_emb, txt_emb)
  assert np.all(np.abs(g_text).sum(-1)[np.asarray(mask)] > 0)
  assert np.all(np.abs(g_image).sum(-1) > 0)
  assert float(jnp.abs(g_img).sum()) > 0 and float(jnp.abs(g_txt).sum()) > 0
  norms = _grad_norms(g_head)
  for name in ('anchor_proj/kernel', 'text_in/kernel', 'image_in/kernel',
               'blocks/0/attention/value/kernel'):
    assert norms[name] > 0, name
  assert norms['match_head/kernel'] == 0  # not used by the anchor loss


def test_the_head_in_chunks_gives_the_same_values_and_gradients_in_less_memory():
  """objective.fuse with chunks = 4 (what optim.accumulation_steps = 4 runs):
  the fused vectors and the gradient with respect to the head and its inputs
  match one call; the compiled backward keeps one chunk's activations (a
  deterministic figure of the compiler), at 64 pairs over 64 image tokens."""
  from ito_jax import objective  # the trainer's entry point to the head

  n, t, p = 64, 16, 64
  with nnx.use_eager_sharding(False):
    model = FusionHead(text_width=DT, image_width=DV, width=64, depth=2, num_heads=4,
                       mlp_ratio=4.0, embed_dim=E, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  text = jnp.asarray(rng.normal(size=(n, t, DT)), jnp.float32)
  mask = jnp.asarray(np.arange(t)[None] < rng.integers(1, t + 1, size=(n, 1)))
  image = jnp.asarray(rng.normal(size=(n, p, DV)), jnp.float32)
  graphdef, state = nnx.split(model)
  target = jnp.asarray(rng.normal(size=(n, 64)), jnp.float32)

  def loss(s, text, image, chunks):
    fused = objective.fuse(nnx.merge(graphdef, s), text, mask, image, chunks)
    return jnp.sum(fused * target), fused

  results, temp = {}, {}
  for chunks in (1, 4):
    fn = jax.jit(jax.value_and_grad(lambda s, x, y: loss(s, x, y, chunks), argnums=(0, 1, 2),
                                    has_aux=True))
    results[chunks] = fn(state, text, image)
    temp[chunks] = fn.lower(state, text, image).compile().memory_analysis().temp_size_in_bytes
  ((_, fused1), grads1), ((_, fused4), grads4) = results[1], results[4]
  np.testing.assert_allclose(fused4, fused1, rtol=1e-5, atol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads1))
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale
  assert temp[4] < 0.5 * temp[1], temp
