"""Every config field ito_jax reads, with its meaning. The checks that run
before anything compiles are in configs/validation.py, re-exported here as
`validate` and `ConfigError`.

An experiment file defines `get_config(arg=None)` that starts from
`base_config()` and overrides fields, after `check_arg` refuses an `arg`
(`--config=FILE:ARG`) that it does not read. Configs are locked: a misspelt
`--config.FIELD=VALUE` override fails in ml_collections with the field's name.
"""

from __future__ import annotations

import ml_collections

from ito_jax.losses import ot as ot_lib
from ito_jax.models.text import TEXT_SIZES
from ito_jax.models import vit as vit_lib

def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, data order and augmentation.
  c.total_steps = 1000  # optimizer steps to train for (>= 0).
  c.log_every_steps = 50  # a metrics.jsonl line every this many steps (> 0).
  c.eval_every_steps = 500  # held-out evaluation every this many steps, and at the end (> 0).
  c.batch_size = 128  # global batch (samples, each with M image and N text views).
  c.checkpoint_every_steps = 500  # async orbax save to WORKDIR/checkpoints every this many steps (> 0).
  c.keep_checkpoints = 3  # most recent checkpoints kept on disk (>= 1).
  # An export directory (WORKDIR/export of an earlier run, or gs://...): a run
  # with no checkpoint yet starts from its image and text towers, projections,
  # temperature and bias, and uses its tokenizer; the fusion head, if any,
  # starts fresh. The towers' sizes must match the export's. A run that resumes
  # reads its checkpoint instead. "" initialises at random.
  c.init_from = ""

  # ---- model ----------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.embed_dim = 256  # shared image-text embedding dimension.
  m.dtype = "float32"  # activation/compute dtype: float32 | bfloat16.
  m.param_dtype = "float32"  # parameter (and optimizer state) dtype.
  m.scan_layers = False  # stack blocks and nnx.scan over them (flat compile time in depth).
  m.remat = "none"  # activation rematerialisation per block: none | full | dots.
  # Attention: einsum (two einsums, f32 logits and softmax, written out) | xla | cudnn
  # (jax.nn.dot_product_attention's implementations; cudnn is the fused GPU kernel).
  # einsum is the default: on the 2-core CPU it made the bench_s step 3-6% faster than
  # xla in alternating rounds (benchmarks/RESULTS.md §0); same values either way.
  m.attention = "einsum"
  # Donate the old train state's buffers to the step (jit donate_argnums), so
  # parameters and optimizer state are updated in place: saves one copy of the
  # state in memory. False only to measure it (benchmarks/RESULTS.md).
  m.donate = True
  m.temperature_init = 10.0  # initial logit scale exp(t) (CLIP uses 1/0.07, SigLIP 10).
  m.bias_init = -10.0  # initial logit bias b; read by the sigmoid loss only.
  m.image = ml_collections.ConfigDict()
  m.image.variant = ""  # informational name, e.g. "B/16"; set sizes with vit().
  m.image.image_size = 224  # input resolution (square); divisible by patch_size.
  m.image.patch_size = 16
  # "patch": one patch_size x patch_size convolution (ViT); "conv": 3x3
  # stride-2 convolutions down to the same token grid (patch_size a power of 2),
  # which a small tower learns local shape with much sooner.
  m.image.stem = "patch"
  m.image.width = 768
  m.image.depth = 12
  m.image.num_heads = 12
  m.image.mlp_ratio = 4.0
  # Patch dropout (FLIP): the fraction of each training image's patch tokens
  # left out of the encoder, drawn afresh every step; evaluation, export and
  # serving encode every token. 0.5 roughly halves the image tower's compute.
  m.image.patch_dropout = 0.0
  # FLIP's unmasked tuning: the last this many training steps encode every
  # patch, through a second compiled step. 0: patch dropout to the end.
  m.image.unmasked_final_steps = 0
  # How evaluation and serving fit an image to image_size x image_size:
  # "squash" resizes the whole frame, stretching non-square images (big_vision);
  # "center_crop" resizes the largest centred square, keeping the aspect
  # (open_clip). Exports carry it, so serving preprocesses as evaluation did.
  m.image.eval_resize = "squash"
  m.text = ml_collections.ConfigDict()
  m.text.variant = ""  # informational name, e.g. "B"; set sizes with text().
  # Embedding rows, and the most pieces the sentencepiece tokenizer is trained
  # to (fewer on a small corpus: Tokenizer.vocab_size is the real count).
  m.text.vocab_size = 8192
  m.text.context_length = 32  # tokens per caption, EOS included.
  m.text.width = 512
  m.text.depth = 12
  m.text.num_heads = 8
  m.text.mlp_ratio = 4.0
  m.fusion = ml_collections.ConfigDict()
  m.fusion.enabled = False  # build the ITO training-time fusion head.
  m.fusion.width = 256  # the head's own width.
  m.fusion.depth = 1  # cross-attention blocks (1-2 is "lightweight").
  m.fusion.num_heads = 4
  m.fusion.mlp_ratio = 2.0
  # The head runs over the batch's pairs in this many rematerialised chunks
  # (objective.fuse): the backward pass keeps one chunk's activations and runs
  # the head's forward twice. 0: optim.accumulation_steps chunks, so the head's
  # activations shrink with A like the towers'.
  m.fusion.remat_chunks = 0

  # ---- objective ------------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  l.name = "softmax"  # softmax (CLIP InfoNCE) | sigmoid (SigLIP).
  l.num_image_views = 1  # M: augmented image views per sample.
  l.num_text_views = 1  # N: caption views per sample.
  l.itm_weight = 0.0  # weight of the fusion head's image-text matching loss.
  l.anchor_weight = 0.0  # weight of the fusion head's fused-anchor alignment loss.
  # Within the anchor loss: weight of mean(1 - cos) pulling each embedding onto
  # its anchor (InfoNCE alone is blind to a constant image-text offset).
  l.anchor_pull_weight = 1.0
  # Batch-level terms (alignment, saturation, ITM mining, anchor) score each batch
  # shard's rows against all-gathered columns under shard_map, so no device holds a
  # global [B, B] (ito_jax/losses/sharded.py). False: the same math on global arrays,
  # laid out by GSPMD.
  l.sharded = True
  l.sigmoid_variant = "gather"  # sigmoid only: gather ([b, B] logits per device) | ring
  #   (text chunks passed round the batch shards with ppermute, [b, b] per device; needs sharded).
  # ITM hard negatives are mined among consecutive pools of this many samples (>= 2)
  # and never cross a batch shard; 0: the whole shard (B / (mesh.data * mesh.fsdp)
  # samples when sharded, else the whole batch). Set it to compare runs on different meshes.
  l.itm_negative_pool = 0
  l.ot_weight = 0.0  # λ_ot: weight of the OT regularizer R_ot (c.ot); 0 turns it off (contrastive only).
  # Partial mode: weight of a contrast on the unaligned batches whose soft targets
  # are R_ot's image-text coupling (objective_ot.plan_contrast); 0 turns it off.
  # Off by default: at ρ = 5% (ot_partial_tiny_cpu, loop, weight 1, one seed) it
  # lowered unseen-class zero-shot accuracy, 0.188 -> 0.179 at 300 steps and
  # 0.179 -> 0.107 at 600, and did not raise R@1 (docs/ot_experiments.md).
  l.ot_plan_contrast_weight = 0.0

  # ---- OT regularizer R_ot (README "Objective"; ito_jax/losses/ot.py) ----------
  # Measures: with partial.enabled, the image and the text embeddings of the
  # unaligned batches (K = 2); otherwise each image and text view of the batch
  # (K = M + N). The solver fields come from ot.default_config():
  #   variant                loop | barycenter.
  #   cost                   cosine (1 - cos) | sqeuclidean (= 2 (1 - cos) on unit vectors: use ~2x eps).
  #   epsilon                entropic regularisation, in units of the cost.
  #   num_iterations         Sinkhorn iterations per solve, fixed (same compiled step every time).
  #   gamma                  loop: weight of the cycle-consistency term.
  #   weights                barycenter: per-measure weights w_k (length K); None = uniform.
  #   barycenter_size        barycenter: support points of nu*; None = mean measure size.
  #   barycenter_iterations  barycenter: outer fixed-point iterations for nu*.
  #   barycenter_tolerance   barycenter: nu* counts as not converged (one more in ot/unconverged) when a
  #                          further fixed-point step would move a support point farther than this
  #                          (the largest such move is logged as ot/barycenter_residual).
  #   min_points             fewest points per measure; fewer is an error naming this field.
  #   marginal_tolerance     L1 marginal error (rows + columns) above which a solve counts as not converged
  #                          (logged as ot/unconverged and ot/marginal_error; counted, not fatal).
  c.ot = ot_lib.default_config()
  # Typed None so that --config.ot.weights='(1, 2)' / --config.ot.barycenter_size=N parse.
  c.ot.weights = ml_collections.FieldReference(None, field_type=tuple)
  c.ot.barycenter_size = ml_collections.FieldReference(None, field_type=int)
  c.ot.start_step = 0  # R_ot enters after this many optimizer steps (a warmup); gated in the jitted step.
  c.ot.include_aligned = False  # partial mode: also put the aligned batch's embeddings into the measures.
  # Subtract the self-transport terms so each W_eps(a, b) becomes the Sinkhorn
  # divergence W(a, b) - W(a, a)/2 - W(b, b)/2: plain W_eps also rewards shrinking
  # both embedding clouds (ito_jax/objective_ot.py), which collapses trainable towers.
  c.ot.debias = False
  # "" | "image" | "text": the modality whose measures R_ot holds fixed (no
  # gradient), so the regularizer moves only the other tower's embeddings
  # towards them; "" trains both. "image" also skips the backward pass through
  # the image tower for the unaligned images. Measured at ρ = 5%
  # (docs/ot_experiments.md): "image" raised unseen-class zero-shot accuracy over both-trained
  # at 300 steps but not held-out R@1, and lowered i2t R@1 at 900 steps.
  c.ot.stop_gradient = ""

  # ---- partially aligned data (README "Objective"; ito_jax/data/partial.py) ----
  # A fraction of the training samples stays as aligned pairs; the rest is split
  # into disjoint halves, an image pool (images only) and a text pool (captions
  # only), so no true pair exists between the pools. The split is a function of
  # data.seed. Each step reads batch_size aligned pairs (contrastive/ITO losses)
  # and unaligned_batch_size images and texts (R_ot).
  c.partial = p = ml_collections.ConfigDict()
  p.enabled = False  # train in partially aligned mode.
  p.aligned_fraction = 0.05  # ρ: fraction of all training samples kept as aligned pairs (0 < ρ < 1).
  p.unseen_classes = ()  # class ids found only in the unaligned pools; eval reports seen/unseen apart.
  p.unaligned_batch_size = 128  # global count of unaligned images, and of unaligned texts, per step.
  # V: augmented views of each unaligned image and distinct captions of each
  # unaligned text; R_ot then has K = 2V measures (objective_ot.measures).
  p.unaligned_views = 1
  # Also drop model.image.patch_dropout's share of the unaligned images'
  # patch tokens (their own draw), so R_ot's image measures cost what the
  # aligned images do; False encodes them whole.
  p.unaligned_patch_dropout = False

  # ---- optimizer: AdamW, linear warmup then cosine decay, global-norm clipping
  c.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 1e-3  # peak learning rate.
  o.warmup_steps = 100
  o.end_learning_rate_factor = 0.0  # final lr = learning_rate * this.
  o.weight_decay = 0.1  # applied to kernels and embeddings, not to norms, biases or scalars.
  o.b1 = 0.9
  o.b2 = 0.98
  o.eps = 1e-6
  o.grad_clip_norm = 1.0  # clip the global gradient norm to this (0 disables).
  # A step whose loss or gradient norm is not finite leaves parameters and
  # optimizer state as they were and is counted in `train/nonfinite_steps`; a
  # log window in which every step was skipped stops the run with an error.
  # False applies every update, NaN included.
  o.skip_nonfinite = True
  # A > 1 runs the towers in A microbatches of batch_size / A samples and
  # caches their outputs, so activation memory is that of one microbatch while
  # the gradient stays exactly the global batch's (every sample contrasted
  # with all others; ito_jax/accumulation.py). Costs a second tower forward.
  o.accumulation_steps = 1
  # Towers that are not trained: "image" and/or "text" (LiT: ("image",) with
  # init_from). A locked tower and its projection keep their initial values,
  # get no gradient (so no backward pass) and no optimizer state; the other
  # tower, the temperature, the bias and the fusion head train.
  o.locked = ()

  # ---- data -----------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.dataset = "ito_shapes"  # the embedded synthetic captioned-shapes data set (when sources are empty).
  d.data_dir = ""  # where the TFDS data set is built/read; "" means WORKDIR/data.
  d.seed = 0  # seeds data set generation (independent of the training seed).
  d.num_train = 8000  # training examples generated.
  d.num_eval = 500  # examples in each of the validation and test splits.
  d.num_workers = 0  # grain worker processes for decode/augment (0: in-process).
  d.crop_scale = (0.7, 1.0)  # random-resized-crop area range.
  d.flip = False  # horizontal flip; off because captions name left and right.
  d.word_dropout = 0.1  # word dropout for augmented text views.
  # Converted sources (`python -m ito_jax.data.convert`): when set, training reads
  # these instead of `dataset`, mixed by weight. Entries: "DIR" (weight 1) or
  # ("DIR", weight), e.g. (("/data/cc3m", 3.0), ("/data/coco", 1.0)).
  d.sources = ()
  # Converted DIR for held-out evaluation; "" means `dataset`'s eval.split, which
  # is refused when `sources` is set (figures on the synthetic set, not yours).
  d.eval_source = ""
  # Bad records (corrupt/truncated/non-image/huge images, empty/non-UTF-8/overlong
  # captions, missing fields) are skipped and counted (metrics data/bad/<kind>);
  # more than this fraction of a source's records being bad is an error naming it.
  d.max_bad_fraction = 0.1
  d.bad_check_min_records = 1000  # records read from a source before max_bad_fraction applies.
  d.max_image_pixels = 50_000_000  # images with more pixels (by header) are skipped unread.
  # (Above PIL's Image.MAX_IMAGE_PIXELS, 89M, the process's PIL limit is raised to match.)
  d.max_caption_chars = 1000  # longer captions are dropped (a record needs one caption left).

  # ---- devices --------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size; -1 means "the devices left over".
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis (batch is split over data x fsdp).
  c.mesh.tensor = 1  # tensor-parallel axis for attention heads and MLP hidden units.
  # Logical axis name -> mesh axes. Parameters carry these names in the model.
  # (The batch always splits over data x fsdp, sharding.BATCH_AXES: no rule.)
  c.logical_axis_rules = (
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("joint", None),
      ("layers", None),
  )

  # ---- evaluation -----------------------------------------------------------
  c.eval = e = ml_collections.ConfigDict()
  e.split = "test"  # held-out split for the final eval.json.
  e.batch_size = 256  # embedding batch for evaluation.
  e.templates = ("a {}.", "a picture of a {}.", "there is a {}.")  # zero-shot prompts.
  # Retrieval ranks each query among this many images (consecutive galleries of
  # the eval split, averaged, like COCO's 5 x 1K); 0: among the whole split.
  e.retrieval_gallery = 0
  # WORKDIR/embeddings.npz holds the first this many held-out images and their
  # first captions (plots, benchmarks/attribute_purity.py); 0: the whole split.
  e.embeddings_limit = 512
  c.lock()  # unknown fields (typos in files or overrides) raise, naming the field
  return c


def check_arg(arg: str | None, config_file: str, accepted: tuple[str, ...] = ()) -> None:
  """Refuses an `ARG` in `--config=FILE:ARG` that `config_file` does not read.

  ml_collections hands whatever follows the colon to `get_config`, so without
  this check a misspelt `:runlocal` would silently train the full run.
  """
  if arg is None or arg == "" or arg in accepted:
    return
  if accepted:
    expected = "expected one of " + ", ".join(repr(a) for a in accepted) + ", or no ':ARG'"
  else:
    expected = "this config takes no ':ARG'; drop it"
  raise ConfigError(f"--config={config_file}:{arg}: unknown config argument {arg!r}; {expected}")


def vit(c: ml_collections.ConfigDict, variant: str) -> None:
  """Sets the image tower to a named size, e.g. vit(c, 'B/16')."""
  c.model.image.variant = variant
  c.model.image.update(vit_lib.parse_variant(variant))


def text(c: ml_collections.ConfigDict, size: str) -> None:
  """Sets the text tower to a named size ('Ti', 'S', 'B', 'L')."""
  if size not in TEXT_SIZES:
    raise ValueError(f"unknown text size {size!r}; expected one of {sorted(TEXT_SIZES)}")
  width, depth, heads = TEXT_SIZES[size]
  c.model.text.update(variant=size, width=width, depth=depth, num_heads=heads)


# The checks live in configs/validation.py; these names are kept here.
from configs.validation import DTYPES, LOSSES, ConfigError, validate  # noqa: E402,F401
