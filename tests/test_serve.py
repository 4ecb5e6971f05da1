"""Serving an export through the Python API and the embed CLI: every image
form, batching, refused inputs, decoding as training does, zero-shot
classification. The HTTP service is in test_serve_http.py."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data_helpers
import tiny_run
from serve_helpers import b64, png_bytes, png_bytes_of, preprocessing_only, random_images
from ito_jax import serve
from ito_jax.data import augment, records
from ito_jax.serve import http as serve_http

pytestmark = pytest.mark.slow


def test_every_image_form_gives_the_same_embedding(embedder, tmp_path):
  images = random_images(3)
  path = tmp_path / "x.png"
  Image.fromarray(images[1]).save(path)
  from_batch = embedder.embed_images(images)
  assert from_batch.shape == (3, embedder.embed_dim) and from_batch.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(from_batch, axis=-1), 1.0, atol=1e-5)
  mixed = embedder.embed_images([images[0], str(path), Image.fromarray(images[2]).convert("RGBA")])
  np.testing.assert_allclose(mixed, from_batch, atol=1e-6)
  one = embedder.embed_images(bytearray(png_bytes(images[0])))  # one image, not a list of ints
  np.testing.assert_allclose(one, from_batch[:1], atol=1e-6)
  preprocessed = embedder.preprocess_image(images[0])  # float [-1, 1] at model size is taken as is
  np.testing.assert_allclose(embedder.embed_images(preprocessed[None]), from_batch[:1], atol=1e-6)


def test_batching_and_padding_do_not_change_embeddings(embedder):
  texts = [f"a red circle number {i}" for i in range(11)]  # 11 > max_batch 8: two chunks, padded
  together = embedder.embed_texts(texts)
  one_by_one = np.concatenate([embedder.embed_texts([t]) for t in texts])
  np.testing.assert_allclose(together, one_by_one, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (["fine", "   "], "texts[1] is empty"),
    ("a string", "list of strings"),
    ([3], "texts[0]: expected a string"),
    (["ok", "a \ud800 b"], "texts[1] is not valid Unicode: a lone surrogate"),
])
def test_bad_texts_are_refused(embedder, bad, message):
  with pytest.raises(serve.InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
    embedder.embed_texts(bad)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8), np.uint8), "expected an RGB image"),
    (np.zeros((5, 5, 3), np.float32), "float images must be preprocessed"),
    (np.full((32, 32, 3), 3.0, np.float32), "must lie in"),
    (b"not an image", "not a decodable image"),
    ("/no/such/file.png", "cannot read image file"),
])
def test_bad_images_are_refused(embedder, bad, message):
  with pytest.raises(serve.InputError, match=message):
    embedder.embed_images([bad])


def test_serving_decodes_images_as_training_does(tmp_path):
  """16-bit grey (PIL's convert clips it to white), transparent pixels of junk
  colour (composited on white) and a photo stored sideways with EXIF
  orientation 6 (turned upright) reach the model as in training/eval, in
  every form: bytes, path, PIL image, HTTP."""
  rng = np.random.default_rng(0)
  grey16 = Image.fromarray(rng.integers(0, 65536, (24, 24)).astype(np.uint16))
  rgba = Image.fromarray(np.dstack([rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                                    np.where(rng.random((24, 24)) < 0.5, 0, 255).astype(np.uint8)]))
  sideways = Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  sideways.save(buf, format="PNG", exif=exif.tobytes())
  bare = preprocessing_only()
  for name, image, data in (("grey16", grey16, png_bytes_of(grey16)), ("rgba", rgba, png_bytes_of(rgba)),
                            ("exif", sideways, buf.getvalue())):
    pixels, repairs = records.decode_image(data, records.Limits.max_image_pixels)
    assert repairs == {"grey16": ("mode_16bit",), "rgba": ("mode_alpha",), "exif": ()}[name]
    assert pixels.shape[:2] == ((36, 24) if name == "exif" else (24, 24))
    want = augment.to_unit_range(augment.resize(pixels, 20))
    np.testing.assert_allclose(want, augment.resize(pixels, 20) / 127.5 - 1, atol=1e-6)  # [-1, 1]
    naive = augment.to_unit_range(augment.resize(np.asarray(image.convert("RGB")), 20))
    assert np.abs(naive - want).max() > 0.5  # the skew this test guards against
    (tmp_path / f"{name}.png").write_bytes(data)
    forms = {"bytes": data, "path": str(tmp_path / f"{name}.png"), "PIL": Image.open(io.BytesIO(data))}
    for form, x in forms.items():
      np.testing.assert_array_equal(bare.preprocess_image(x), want, err_msg=f"{name} as {form}")
    via_http = serve_http.decode_image(b64(data), "images[0]", bare, serve_http.Limits())
    np.testing.assert_array_equal(via_http, want, err_msg=f"{name} over HTTP")


def test_undecodable_images_are_client_errors():
  bare = preprocessing_only()
  limits = serve_http.Limits(max_image_pixels=1_000_000)
  for name, data in data_helpers.bad_images(np.random.default_rng(1)).items():
    kind = name.split(".")[0]
    with pytest.raises(serve_http.RequestError) as err:
      serve_http.decode_image(b64(data), "images[3]", bare, limits)
    assert err.value.status == (413 if kind == "image_too_large" else 400), (name, err.value)
    assert "images[3]" in str(err.value) and (kind == "image_too_large" or kind in str(err.value))
    with pytest.raises(serve.InputError, match="too large" if kind == "image_too_large"
                       else "not a decodable image"):
      bare.preprocess_image(data, max_pixels=1_000_000)


def test_zero_shot_classifier(embedder):
  names, templates = ["red circle", "blue square", "green star"], ["a {}.", "there is a {}."]
  clf = embedder.zero_shot_classifier(names, templates)
  prompts = embedder.embed_texts([t.format(n) for n in names for t in templates]).reshape(3, 2, -1)
  mean = prompts.mean(axis=1)
  np.testing.assert_allclose(clf.weights, mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                             atol=1e-6)
  images = random_images(4)
  logits = clf.logits(images)
  assert logits.shape == (4, 3)
  assert clf.predict(images) == [names[i] for i in logits.argmax(-1)]
  assert embedder.zero_shot_classifier(names).weights.shape == (3, embedder.embed_dim)  # run's templates
  np.testing.assert_array_equal(np.asarray(clf), clf.weights)  # usable as the [classes, D] matrix
  with pytest.raises(serve.InputError, match="template 'no placeholder' has no '{}'"):
    embedder.zero_shot_classifier(names, ["no placeholder"])
  with pytest.raises(serve.InputError, match=r"template 'a \{\} \{x\}' takes one '\{\}' .*KeyError"):
    embedder.zero_shot_classifier(names, ["a {}.", "a {} {x}"])
  with pytest.raises(serve.InputError, match="templates is empty"):
    embedder.zero_shot_classifier(names, [])


def test_embed_cli_on_two_devices(embedder, tiny_reference_run, tmp_path):
  """`python -m ito_jax.serve embed` (images and a text file) in a process with 2 devices."""
  images = random_images(3)
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  texts = ["a red circle", "two blue squares on the left"]
  (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
  export_dir = os.path.join(tiny_reference_run["workdir"], "export")
  script = (f"from ito_jax.serve.__main__ import main; import jax; assert jax.device_count() == 2; "
            f"main(['embed', '--export={export_dir}', '--images', *{paths!r}, "
            f"'--out={tmp_path / 'images.npy'}']); "
            f"main(['embed', '--export={export_dir}', '--texts={tmp_path / 'texts.txt'}', "
            f"'--out={tmp_path / 'texts.npy'}'])")
  out = subprocess.run([sys.executable, "-c", script], cwd=tiny_run.ROOT, capture_output=True,
                       text=True, timeout=tiny_run.TIMEOUT,
                       env=tiny_run.env(tiny_reference_run["cache_dir"], devices=2))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "wrote 3 embeddings" in out.stdout and "wrote 2 embeddings" in out.stdout
  np.testing.assert_allclose(np.load(tmp_path / "images.npy"), embedder.embed_images(images), atol=1e-6)
  np.testing.assert_allclose(np.load(tmp_path / "texts.npy"), embedder.embed_texts(texts), atol=1e-6)
