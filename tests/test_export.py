"""The encoder-only export: contents, round trip against the training model,
the export command, and every kind of bad export it must refuse."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import data_helpers
import tiny_run
from ito_jax import checkpoint, export, serve, train
from ito_jax.data import pipeline
from ito_jax.data import tokenizer as tokenizer_lib
from ito_jax.evaluate.evaluator import embed_in_batches
from ito_jax.models import ito
from ito_jax.models.ito import count_params, encoder_filter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_reference_run):
  """The reference run's final model (restored from its last checkpoint), config, eval data."""
  ref = tiny_reference_run
  config = tiny_run.config(ref["data_dir"])
  mesh = train.sharding.make_mesh(config)
  graphdef, abstract = train.abstract_model_and_optimizer(config, mesh)
  state, step = checkpoint.Checkpointer(ref["workdir"], config, read_only=True).restore(abstract)
  model, _ = nnx.merge(graphdef, state)
  _, tokenizer = train.prepare_inputs(config, ref["workdir"])
  eval_data = pipeline.eval_arrays(config, tokenizer, "test", data_dir=ref["data_dir"])
  return dict(model=model, config=config, step=step, eval=eval_data,
              export_dir=os.path.join(ref["workdir"], "export"))


def test_export_holds_the_encoders_and_nothing_else(trained):
  model, export_dir = trained["model"], trained["export_dir"]
  assert model.fusion_head is not None  # the run trained with the fusion head
  with open(os.path.join(export_dir, "manifest.json")) as f:
    manifest = json.load(f)
  with np.load(os.path.join(export_dir, "params.npz"), allow_pickle=False) as npz:
    stored = {name: npz[name].size for name in npz.files}
  encoders = count_params(model, encoder_filter())
  assert manifest["param_count"] == sum(stored.values()) == encoders
  assert encoders < count_params(model)  # the fusion head is left out
  assert set(stored) == set(manifest["params"])
  assert {name.split("/")[0] for name in stored} == {
      "image_tower", "text_tower", "image_proj", "text_proj", "log_scale", "logit_bias"}
  assert sorted(os.listdir(export_dir)) == sorted(export.FILES)  # no optimizer or data state
  assert manifest["step"] == trained["step"] == tiny_run.TOTAL_STEPS
  assert manifest["trained_with_fusion"] is True
  with open(os.path.join(export_dir, "model_config.json")) as f:
    assert json.load(f)["fusion"]["enabled"] is False


def test_served_embeddings_equal_the_training_model(trained, tiny_reference_run):
  """Serving (uint8 images resized by the embedder, raw caption strings) gives
  the training model's encoder outputs on the same inputs."""
  model, config, ev = trained["model"], trained["config"], trained["eval"]
  embedder = serve.load(trained["export_dir"])
  source = pipeline.builder_for(config, tiny_reference_run["data_dir"]).as_data_source("test")
  records = sorted((source[i] for i in range(len(source))), key=lambda r: r["id"])
  images_u8 = np.stack([r["image"] for r in records])  # [64, 64, 64, 3] stored resolution
  captions = [r["captions"][0].decode() for r in records]

  encode_image = nnx.jit(lambda m, x: m.encode_image(x))
  encode_text = nnx.jit(lambda m, t: m.encode_text(t))
  want_images = embed_in_batches(encode_image, model, ev["images"], 64)
  want_texts = embed_in_batches(encode_text, model, ev["tokens"][:, 0], 64)
  got_images, got_texts = embedder.embed_images(images_u8), embedder.embed_texts(captions)
  assert got_images.shape == (64, config.model.embed_dim)
  np.testing.assert_allclose(got_images, want_images, rtol=0, atol=2e-6)
  np.testing.assert_allclose(got_texts, want_texts, rtol=0, atol=2e-6)
  # and the temperature/bias travelled too
  exported = export.load(trained["export_dir"]).model
  assert float(exported.log_scale[...]) == float(model.log_scale[...])
  assert float(exported.logit_bias[...]) == float(model.logit_bias[...])


def test_export_command_on_two_devices_matches_the_automatic_export(trained, tiny_reference_run,
                                                                    tmp_path):
  """`python -m ito_jax.main export` reads only the encoder arrays of the
  latest checkpoint (partial restore), here in a 2-device process."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_reference_run["workdir"], workdir)
  shutil.rmtree(os.path.join(workdir, "export"))
  out = subprocess.run([sys.executable, "-m", "ito_jax.main", "export", f"--workdir={workdir}"],
                       cwd=tiny_run.ROOT, env=tiny_run.env(tiny_reference_run["cache_dir"], devices=2),
                       capture_output=True, text=True, timeout=tiny_run.TIMEOUT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Encoder-only export written to" in out.stdout
  with np.load(os.path.join(workdir, "export", "params.npz")) as a, \
      np.load(os.path.join(trained["export_dir"], "params.npz")) as b:
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_export_module_runs_the_export_command(tmp_path):
  """`python -m ito_jax.export --workdir=DIR` is `python -m ito_jax.main
  export`: in a workdir with no checkpoint it fails saying so, instead of
  exiting 0 having done nothing."""
  out = subprocess.run([sys.executable, "-m", "ito_jax.export", f"--workdir={tmp_path}"],
                       cwd=tiny_run.ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=tiny_run.TIMEOUT)
  assert out.returncode != 0
  assert f"no checkpoint in {tmp_path}/checkpoints: train first" in out.stderr


# =============================================================================
# Bad exports: each is refused with an error naming the file and the problem
# =============================================================================
def _rewrite_params(export_dir, change):
  path = os.path.join(export_dir, "params.npz")
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  change(arrays)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _edit_json(export_dir, name, change):
  path = os.path.join(export_dir, name)
  with open(path) as f:
    data = json.load(f)
  change(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _truncate(export_dir, name):
  path = os.path.join(export_dir, name)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _smuggle_fusion(export_dir):
  extra = np.zeros((32, 32), np.float32)
  _rewrite_params(export_dir, lambda a: a.update({"fusion_head/anchor_proj/kernel": extra}))
  _edit_json(export_dir, "manifest.json", lambda m: m["params"].update(
      {"fusion_head/anchor_proj/kernel": {"shape": [32, 32], "dtype": "float32"}}))


def _object_array(export_dir):  # what a pickled payload would need
  _rewrite_params(export_dir, lambda a: a.update({"image_proj/kernel": np.array([{"x": 1}], object)}))


BAD_EXPORTS = {
    "missing manifest": (lambda d: os.remove(os.path.join(d, "manifest.json")),
                         ["manifest.json", "missing"]),
    "missing config": (lambda d: os.remove(os.path.join(d, "model_config.json")),
                       ["model_config.json", "missing"]),
    "missing weights": (lambda d: os.remove(os.path.join(d, "params.npz")), ["params.npz", "missing"]),
    "missing tokenizer": (lambda d: os.remove(os.path.join(d, "tokenizer.model")),
                          ["tokenizer.model", "missing"]),
    "shape mismatch": (lambda d: _rewrite_params(
        d, lambda a: a.update({"text_proj/kernel": a["text_proj/kernel"][:, :16]})),
                       ["params.npz", "shape mismatch", "text_proj/kernel", "[32, 16]"]),
    "array missing from the weights": (lambda d: _rewrite_params(d, lambda a: a.pop("logit_bias")),
                                       ["params.npz", "missing ['logit_bias']"]),
    "config embed_dim does not match the weights": (
        lambda d: _edit_json(d, "model_config.json", lambda c: c.update(embed_dim=16)),
        ["model_config.json", "does not match params.npz", "image_proj/kernel", "[32, 32]", "[32, 16]"]),
    "config depth does not match the weights": (
        lambda d: _edit_json(d, "model_config.json", lambda c: c["image"].update(depth=2)),
        ["model_config.json", "does not match params.npz", "image_tower/encoder/blocks/1",
         "missing from the weights"]),
    "config with an unknown field": (
        lambda d: _edit_json(d, "model_config.json", lambda c: c.update(embed_dims=16)),
        ["model_config.json", "embed_dims"]),
    "fusion head in the weights": (_smuggle_fusion,
                                   ["model_config.json", "fusion_head/anchor_proj/kernel",
                                    "not in the model the config builds"]),
    "truncated weights": (lambda d: _truncate(d, "params.npz"), ["params.npz", "unreadable"]),
    "pickled object array": (_object_array, ["params.npz", "unreadable", "allow_pickle"]),
    "corrupt manifest": (lambda d: _truncate(d, "manifest.json"), ["manifest.json", "unreadable JSON"]),
    "garbage tokenizer": (lambda d: open(os.path.join(d, "tokenizer.model"), "wb").write(b"not a model"),
                          ["tokenizer.model", "sha256", "truncated or was replaced"]),
    "garbage tokenizer, no sha256 recorded": (
        lambda d: (_edit_json(d, "manifest.json", lambda m: m.pop("tokenizer")),
                   open(os.path.join(d, "tokenizer.model"), "wb").write(b"not a model")),
        ["tokenizer.model", "not a sentencepiece model"]),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_bad_export_is_refused_with_a_named_error(case, trained, tmp_path):
  export_dir = str(tmp_path / "export")
  shutil.copytree(trained["export_dir"], export_dir)
  damage, expected = BAD_EXPORTS[case]
  damage(export_dir)
  with pytest.raises(export.ExportError) as err:
    serve.load(export_dir)
  for fragment in expected:
    assert fragment in str(err.value), (fragment, str(err.value))


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
  """An export of a small untrained model: load's checks without the reference run."""
  base = tmp_path_factory.mktemp("micro_export")
  config = data_helpers.micro_config()
  tokenizer_lib.train_tokenizer([f"a red circle number {i}" for i in range(30)],
                                str(base / "tokenizer.model"), 64)
  with nnx.use_eager_sharding(False):
    model = ito.ItoModel(config.model, rngs=nnx.Rngs(0))
  params = {k: np.asarray(v) for k, v in
            export.flatten(nnx.to_pure_dict(nnx.state(model, encoder_filter()))).items()}
  return export.write(params, config.model, str(base / "tokenizer.model"), str(base / "export"),
                      step=0)


def _entry(m, value):
  first = sorted(m["params"])[0]
  return {**m, "params": {**m["params"], first: value}}


MALFORMED_MANIFESTS = {
    "a list": (lambda m: [m], "expected a JSON object, got list"),
    "no params": (lambda m: {k: v for k, v in m.items() if k != "params"}, "'params' is missing"),
    "params a list": (lambda m: {**m, "params": list(m["params"])}, "'params' must be an object"),
    "entry a string": (lambda m: _entry(m, "x"), "params entry 'image_proj/kernel' must be"),
    "entry without dtype": (lambda m: _entry(m, {"shape": [32]}), "params entry 'image_proj/kernel'"),
    "shape of strings": (lambda m: _entry(m, {"shape": ["32"], "dtype": "float32"}),
                         "params entry 'image_proj/kernel'"),
    "templates a string": (lambda m: {**m, "templates": "a {}"}, "'templates' must be a list"),
    "tokenizer without sha256": (lambda m: {**m, "tokenizer": {"vocab_size": 64}},
                                 "'tokenizer' must be {'sha256': str, 'vocab_size': int}"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MANIFESTS))
def test_structurally_malformed_manifest_is_an_export_error(case, micro_export, tmp_path):
  export_dir = str(tmp_path / "export")
  shutil.copytree(micro_export, export_dir)
  change, message = MALFORMED_MANIFESTS[case]
  path = os.path.join(export_dir, "manifest.json")
  with open(path) as f:
    manifest = change(json.load(f))
  with open(path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(export.ExportError, match=f"manifest.json: .*{re.escape(message)}"):
    export.load(export_dir)


def test_tokenizer_is_checked_against_the_manifest(micro_export, tmp_path):
  with open(os.path.join(micro_export, "manifest.json")) as f:
    recorded = json.load(f)["tokenizer"]
  with open(os.path.join(micro_export, "tokenizer.model"), "rb") as f:
    good = f.read()
  assert recorded == {"sha256": hashlib.sha256(good).hexdigest(),
                      "vocab_size": tokenizer_lib.Tokenizer(good).vocab_size}

  def damaged(name, tokenizer_bytes=None, manifest_change=None):
    export_dir = str(tmp_path / name)
    shutil.copytree(micro_export, export_dir)
    if tokenizer_bytes is not None:
      with open(os.path.join(export_dir, "tokenizer.model"), "wb") as f:
        f.write(tokenizer_bytes)
    if manifest_change is not None:
      _edit_json(export_dir, "manifest.json", manifest_change)
    return export_dir

  # A prefix of a sentencepiece model can still parse (as a 7-piece model).
  with pytest.raises(export.ExportError, match="tokenizer.model: sha256 .* truncated or was replaced"):
    export.load(damaged("truncated", good[:100]))
  wrong = recorded["vocab_size"] + 1
  with pytest.raises(export.ExportError, match=f"tokenizer.model: {wrong - 1} pieces, but "
                                               f"manifest.json records vocab_size {wrong}"):
    export.load(damaged("vocab", manifest_change=lambda m: m["tokenizer"].update(vocab_size=wrong)))
  older = export.load(damaged("older", manifest_change=lambda m: m.pop("tokenizer")))
  assert older.tokenizer.vocab_size == recorded["vocab_size"]  # exports before the field still load


def _micro_params(config):
  with nnx.use_eager_sharding(False):
    model = ito.ItoModel(config.model, rngs=nnx.Rngs(0))
  return {k: np.asarray(v) for k, v in
          export.flatten(nnx.to_pure_dict(nnx.state(model, encoder_filter()))).items()}


def test_a_tokenizer_with_more_pieces_than_the_text_vocab_is_refused(tmp_path):
  """Ids past the text embedding table embed as NaN. An export whose
  model_config has text.vocab_size one less than its tokenizer's pieces (the
  manifest's sha256 and vocab_size agreeing with that tokenizer) fails to load."""
  texts = [f"a red circle number {i}" for i in range(30)]
  larger = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "larger.model"), 64)
  pieces = larger.vocab_size  # as many as these texts give, under the 64 asked for
  fits = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "fits.model"), pieces - 1)
  assert fits.vocab_size == pieces - 1
  config = data_helpers.micro_config()
  config.model.text.vocab_size = pieces - 1
  export_dir = export.write(_micro_params(config), config.model, str(tmp_path / "fits.model"),
                            str(tmp_path / "export"), step=0)
  assert export.load(export_dir).tokenizer.vocab_size == pieces - 1  # the same export, fitting
  shutil.copy(tmp_path / "larger.model", os.path.join(export_dir, "tokenizer.model"))
  digest = hashlib.sha256((tmp_path / "larger.model").read_bytes()).hexdigest()
  _edit_json(export_dir, "manifest.json",
             lambda m: m.update(tokenizer={"sha256": digest, "vocab_size": pieces}))
  with pytest.raises(export.ExportError, match=re.escape(
      f"tokenizer.model: {pieces} pieces, more than model_config.json text.vocab_size {pieces - 1}")):
    export.load(export_dir)


def test_write_refuses_a_tokenizer_with_more_pieces_than_the_text_vocab(tmp_path):
  """Rather than write an export that load refuses; nothing is left behind."""
  texts = [f"a red circle number {i}" for i in range(30)]
  pieces = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "tok.model"), 64).vocab_size
  config = data_helpers.micro_config()
  config.model.text.vocab_size = pieces - 1
  with pytest.raises(ValueError, match=re.escape(
      f"tok.model has {pieces} pieces, more than model.text.vocab_size {pieces - 1}")):
    export.write(_micro_params(config), config.model, str(tmp_path / "tok.model"),
                 str(tmp_path / "export"), step=0)
  assert sorted(os.listdir(tmp_path)) == ["tok.model"]


def test_bfloat16_parameters_round_trip_without_pickle(tmp_path, trained):
  params = {"a/kernel": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}
  export.write({k: np.asarray(v) for k, v in params.items()}, trained["config"].model,
               os.path.join(trained["export_dir"], "tokenizer.model"), str(tmp_path / "e"), step=0)
  with open(tmp_path / "e" / "manifest.json") as f:
    assert json.load(f)["params"]["a/kernel"] == {"shape": [2, 3], "dtype": "bfloat16"}
  loaded = export._read_params(str(tmp_path / "e"), json.loads((tmp_path / "e" / "manifest.json").read_text()))
  assert loaded["a/kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded["a/kernel"].astype(np.float32), np.arange(6).reshape(2, 3))


def test_training_only_settings_do_not_stop_an_export_from_loading_and_serving(tmp_path):
  """A run with FLIP's unmasked phase longer than the default total_steps, and
  cudnn attention, exports a model that loads and embeds on this CPU: the
  serving config has no patch dropout and xla attention. Exports written with
  those settings still in model_config.json load the same way."""
  config = data_helpers.micro_config()
  config.total_steps = 3000
  config.model.image.patch_dropout = 0.5
  config.model.image.unmasked_final_steps = 1500
  config.model.attention = "cudnn"
  texts = [f"a red circle number {i}" for i in range(30)]
  tokenizer_lib.train_tokenizer(texts, str(tmp_path / "tok.model"), 64)
  export_dir = export.write(_micro_params(config), config.model, str(tmp_path / "tok.model"),
                            str(tmp_path / "export"), step=3000)
  with open(os.path.join(export_dir, "model_config.json")) as f:
    saved = json.load(f)
  assert (saved["attention"], saved["image"]["patch_dropout"],
          saved["image"]["unmasked_final_steps"]) == ("xla", 0.0, 0)
  served = serve.load(export_dir).embed_texts(texts[:2])
  _edit_json(export_dir, "model_config.json",
             lambda c: (c.update(attention="cudnn"),
                        c["image"].update(patch_dropout=0.5, unmasked_final_steps=1500)))
  np.testing.assert_allclose(serve.load(export_dir).embed_texts(texts[:2]), served, atol=1e-6)


def test_served_texts_are_whitespace_normalised_as_training_captions_were(micro_export):
  """records.parse turns every run of Unicode whitespace into one space
  before tokenizing; serving must too, or "a\x85b" gets other ids than "a b"."""
  embedder = serve.load(micro_export)
  np.testing.assert_array_equal(embedder.tokenize(["a red\x85circle\x1c left ", "a\tred  circle\n"]),
                                embedder.tokenize(["a red circle left", "a red circle"]))


def test_serving_fits_images_as_the_exported_config_says(micro_export, tmp_path):
  """model.image.eval_resize travels in the export: a wide image is squashed
  by default and centre-cropped when the model config says 'center_crop', as
  evaluation did. Exports written before the field existed squash."""
  size = serve.load(micro_export).image_size
  wide = np.random.default_rng(0).integers(0, 256, (size, 2 * size, 3), dtype=np.uint8)
  centre = wide[:, size // 2: size // 2 + size]
  squashing = serve.load(micro_export)
  assert squashing.eval_resize == "squash"
  assert np.abs(squashing.preprocess_image(wide) - squashing.preprocess_image(centre)).max() > 0.5
  export_dir = str(tmp_path / "crop")
  shutil.copytree(micro_export, export_dir)
  _edit_json(export_dir, export.CONFIG, lambda c: c["image"].update(eval_resize="center_crop"))
  cropping = serve.load(export_dir)
  np.testing.assert_array_equal(cropping.preprocess_image(wide), cropping.preprocess_image(centre))
  older = str(tmp_path / "older")
  shutil.copytree(micro_export, older)
  _edit_json(older, export.CONFIG, lambda c: c["image"].pop("eval_resize"))
  assert serve.load(older).eval_resize == "squash"


def test_a_failed_replacement_leaves_the_previous_export_whole(tmp_path, monkeypatch):
  """Writing over an export: until the new one is in place, the old one is
  whole at its path or set aside, never half deleted; a rename that fails
  puts it back, and a later write replaces it and leaves nothing behind."""
  from etils import epath

  config = data_helpers.micro_config()
  tokenizer_lib.train_tokenizer([f"a red circle number {i}" for i in range(30)],
                                str(tmp_path / "tok.model"), 64)
  params = _micro_params(config)
  path = str(tmp_path / "export")
  export.write(params, config.model, str(tmp_path / "tok.model"), path, step=1)
  before = {name: (tmp_path / "export" / name).read_bytes() for name in export.FILES}

  rename = type(epath.Path(path)).rename  # the concrete class's (epath.Path's is abstract)

  def failing(self, target):
    if ".tmp-" in self.name:
      raise OSError("disk gone")
    return rename(self, target)

  monkeypatch.setattr(type(epath.Path(path)), "rename", failing)
  with pytest.raises(OSError, match="disk gone"):
    export.write(params, config.model, str(tmp_path / "tok.model"), path, step=2)
  monkeypatch.undo()
  assert {name: (tmp_path / "export" / name).read_bytes() for name in export.FILES} == before
  assert export.load(path).manifest["step"] == 1
  export.write(params, config.model, str(tmp_path / "tok.model"), path, step=3)
  assert export.load(path).manifest["step"] == 3
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("export")) == ["export"]
