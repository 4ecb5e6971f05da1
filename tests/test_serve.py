"""Serving an export: the Python API, the embed CLI, the HTTP service (each
malformed request refused with a 4xx, the server staying up), request
batching, and a short load test."""

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest
from PIL import Image

import data_helpers
import tiny_run
from ito_jax import serve
from ito_jax.data import augment, records
from ito_jax.serve import http as serve_http
from ito_jax.serve import loadtest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder(tiny_reference_run):
  return serve.load(os.path.join(tiny_reference_run["workdir"], "export"), max_batch=8)


def random_images(n, size=48, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
  return png_bytes_of(Image.fromarray(image))


def png_bytes_of(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


# =============================================================================
# Python API and CLI
# =============================================================================
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


def _preprocessing_only(image_size=20):
  """An Embedder without a model: enough for its preprocessing."""
  bare = serve.Embedder.__new__(serve.Embedder)
  bare.image_size = image_size
  return bare


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
  bare = _preprocessing_only()
  for name, image, data in (("grey16", grey16, png_bytes_of(grey16)), ("rgba", rgba, png_bytes_of(rgba)),
                            ("exif", sideways, buf.getvalue())):
    pixels, repair = records.decode_image(data, records.Limits.max_image_pixels)
    assert repair in ("mode_16bit", "mode_alpha", None)
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
  bare = _preprocessing_only()
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
  with pytest.raises(serve.InputError, match="'{}'"):
    embedder.zero_shot_classifier(names, ["no placeholder"])


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


# =============================================================================
# HTTP service
# =============================================================================
LIMITS = serve_http.Limits(max_body_bytes=64 << 10, max_items=4, max_text_chars=80,
                           max_image_bytes=16 << 10, max_image_pixels=128 * 128)


@pytest.fixture(scope="module")
def server(embedder):
  srv = serve_http.start(embedder, port=0, limits=LIMITS, max_wait_ms=50.0)
  yield srv
  srv.shutdown()
  srv.server_close()


def request(server, method, path, body=None, headers=None):
  host, port = server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())
  finally:
    conn.close()


def post_json(server, path, payload):
  return request(server, "POST", path, json.dumps(payload).encode(),
                 {"Content-Type": "application/json"})


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def test_http_embeddings_equal_the_api(server, embedder):
  assert server.server_address[0] == "127.0.0.1"
  texts = ["a red circle", "a blue square"]
  status, body = post_json(server, "/embed/text", {"texts": texts})
  assert status == 200
  np.testing.assert_allclose(body["embeddings"], embedder.embed_texts(texts), atol=1e-6)
  images = random_images(2)
  status, body = post_json(server, "/embed/image", {"images": [b64(png_bytes(x)) for x in images]})
  assert status == 200
  np.testing.assert_allclose(body["embeddings"], embedder.embed_images(images), atol=1e-6)


def test_concurrent_requests_share_forward_passes(server, embedder):
  texts = [[f"a yellow star number {i}", f"a green cross number {i}"] for i in range(8)]
  results = [None] * len(texts)

  def client(i):
    results[i] = post_json(server, "/embed/text", {"texts": texts[i]})

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  for i, (status, body) in enumerate(results):
    assert status == 200
    np.testing.assert_allclose(body["embeddings"], embedder.embed_texts(texts[i]), atol=1e-6)
  assert server.batchers["text"].largest_batch > 2  # rows of several requests in one pass


def request_url(url: str) -> tuple[int, dict]:
  parsed = urllib.parse.urlparse(url)
  conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
  try:
    conn.request("GET", parsed.path)
    response = conn.getresponse()
    return response.status, json.loads(response.read())
  finally:
    conn.close()


def _raw(server, data: bytes) -> tuple[int, dict]:
  """Sends bytes as they are (for requests http.client will not make)."""
  with socket.create_connection(server.server_address[:2], timeout=30) as sock:
    sock.sendall(data)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


TINY_PNG = png_bytes(np.zeros((8, 8, 3), np.uint8))
MALFORMED = {
    "malformed JSON": ("/embed/text", b'{"texts": ["a red', 400, "malformed JSON"),
    "body not UTF-8": ("/embed/text", b'\xff\xfe{"texts"', 400, "malformed JSON"),
    "JSON not an object": ("/embed/text", b'["a red circle"]', 400, "JSON object"),
    "missing field": ("/embed/text", b'{"text": ["a"]}', 400, "missing field 'texts'"),
    "texts not a list": ("/embed/text", b'{"texts": "a red circle"}', 400, "'texts' must be a list"),
    "text not a string": ("/embed/text", b'{"texts": ["ok", 7]}', 400, "texts[1] must be a string"),
    "no texts": ("/embed/text", b'{"texts": []}', 400, "'texts' is empty"),
    "empty text": ("/embed/text", b'{"texts": ["ok", " "]}', 400, "texts[1] is empty"),
    "too many texts": ("/embed/text", json.dumps({"texts": ["a"] * 5}).encode(), 413,
                       "5 texts exceed the limit of 4"),
    "text too long": ("/embed/text", json.dumps({"texts": ["a" * 81]}).encode(), 413,
                      "texts[0] has 81 characters"),
    "bad base64": ("/embed/image", b'{"images": ["not*base64!"]}', 400, "images[0] is not valid base64"),
    "not an image": ("/embed/image", json.dumps({"images": [b64(b"GIF? no, plain text")]}).encode(),
                     400, "images[0] is not a decodable image"),
    "image too many pixels": ("/embed/image", json.dumps(
        {"images": [b64(TINY_PNG), b64(png_bytes(np.zeros((200, 200, 3), np.uint8)))]}).encode(),
                              413, "images[1] is too large: 200x200 > 16384 pixels"),
    "image too many bytes": ("/embed/image", json.dumps(
        {"images": [b64(png_bytes(random_images(1, 96)[0]))]}).encode(), 413,
                             "images[0] is over the limit of 16384 bytes"),
    "body too large": ("/embed/text", json.dumps({"texts": ["a"] * 40000}).encode(), 413,
                       "exceeds the limit of 65536"),
    "unknown path": ("/embed/audio", b'{"texts": ["a"]}', 404, "no such path"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_4xx_and_server_stays_up(server, case):
  path, body, want_status, message = MALFORMED[case]
  status, reply = request(server, "POST", path, body, {"Content-Type": "application/json"})
  assert status == want_status, reply
  assert message in reply["error"], reply["error"]
  status, health = request(server, "GET", "/health")
  assert status == 200 and health["status"] == "ok"


def _stand_in(fail=False):
  """A stand-in embedder: request handling without a trained model."""
  import types  # pylint: disable=g-import-not-at-top

  def embed(rows):
    if fail:
      raise RuntimeError("device lost")
    return np.ones((len(rows), 2), np.float32)

  return types.SimpleNamespace(
      max_batch=4, embed_dim=2, image_size=8, preprocess_image=_preprocessing_only(8).preprocess_image,
      tokenize=lambda texts: np.zeros((len(texts), 4), np.int32),
      embed_tokens=embed, embed_preprocessed_images=embed)


@pytest.fixture(scope="module")
def modelless_server():
  srv = serve_http.start(_stand_in(), port=0, limits=LIMITS)
  yield srv
  srv.shutdown()
  srv.server_close()


def test_model_failure_is_500_and_unknown_path_404():
  """A failing model is the server's fault (500 naming the exception), not the
  client's; an unknown GET path is 404; the server keeps answering."""
  srv = serve_http.start(_stand_in(fail=True), port=0, limits=LIMITS)
  try:
    status, reply = post_json(srv, "/embed/text", {"texts": ["a red circle"]})
    assert status == 500 and "RuntimeError: device lost" in reply["error"], (status, reply)
    status, reply = request(srv, "GET", "/metrics")
    assert status == 404 and "no such path" in reply["error"], (status, reply)
    assert request(srv, "GET", "/health")[0] == 200
  finally:
    srv.shutdown()
    srv.server_close()


def test_batcher_never_runs_more_than_max_batch_rows():
  """Six concurrent 3-row jobs with max_batch=4: two jobs (6 rows) must never
  share a pass, and each job gets back its own rows."""
  seen = []

  def double(x):
    seen.append(len(x))
    return x * 2

  batcher = serve_http.Batcher(double, max_batch=4, max_wait_ms=200)
  out = [None] * 6

  def client(i):
    out[i] = batcher.submit(np.full((3, 1), i, np.float32))

  threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  batcher.close()
  assert max(seen) <= 4 and batcher.largest_batch <= 4, seen
  for i in range(6):
    np.testing.assert_array_equal(out[i], np.full((3, 1), 2 * i))


def test_float_images_below_minus_one_are_refused():
  """Preprocessed float images must lie in [-1, 1] on both sides: -3.0 is refused."""
  with pytest.raises(serve.InputError, match="must lie in"):
    _preprocessing_only(8).preprocess_image(np.full((8, 8, 3), -3.0, np.float32))


@pytest.mark.parametrize("body, message", [
    (b'{"texts": ["ok", "\\ud800 red"]}', "texts[1] is not valid Unicode: a lone surrogate"),
    (b"[" * 20_000 + b"]" * 20_000, "malformed JSON: nested too deeply"),
    (b'{"texts": ' + b"1" * 5000 + b"}", "malformed JSON: Exceeds the limit"),  # Python's int cap
])
def test_unencodable_text_and_deep_json_get_400(modelless_server, body, message):
  status, reply = request(modelless_server, "POST", "/embed/text", body,
                          {"Content-Type": "application/json"})
  assert status == 400 and message in reply["error"], (status, reply)
  status, reply = post_json(modelless_server, "/embed/text", {"texts": ["a red circle"]})
  assert status == 200 and reply["embeddings"] == [[1.0, 1.0]]


@pytest.mark.parametrize("raw, want_status, message", [
    (b"POST /embed/text HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    (b"POST /embed/text HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "bad Content-Length"),
    (b"PUT /embed/text HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "PUT is not supported"),
])
def test_malformed_http_framing_gets_4xx(server, raw, want_status, message):
  status, reply = _raw(server, raw)
  assert status == want_status and message in reply["error"], reply
  assert request(server, "GET", "/health")[0] == 200


def test_a_short_body_gets_400_and_a_stalled_one_408(modelless_server, monkeypatch):
  """A body shorter than its Content-Length: 400 once the client stops sending
  (half-close), 408 once it stalls past the handler's timeout; never a 500."""
  head = b"POST /embed/text HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
  with socket.create_connection(modelless_server.server_address[:2], timeout=30) as sock:
    sock.sendall(head + b'{"texts": ["a"]}')
    sock.shutdown(socket.SHUT_WR)
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 400 and b"ended after 16 of 100 bytes" in response.read()
  monkeypatch.setattr(serve_http._Handler, "timeout", 0.5)  # pylint: disable=protected-access
  status, reply = _raw(modelless_server, head + b'{"texts": ["a"]}')
  assert status == 408 and "did not arrive within 0.5 s" in reply["error"], reply


def test_a_burst_of_new_connections_is_queued_not_refused():
  """Connections wait in the listen queue until the server accepts them:
  socketserver's default queue of 5 dropped the rest of a burst."""
  srv = serve_http.EmbeddingServer(_stand_in(), port=0, limits=LIMITS)  # listening, not accepting
  socks = []
  try:
    for _ in range(40):
      socks.append(socket.create_connection(srv.server_address[:2], timeout=2))
  finally:
    for sock in socks:
      sock.close()
    srv.server_close()
  assert len(socks) == 40


def test_load_test_server_takes_a_relative_export_and_reports_a_failed_start(
    tiny_reference_run, monkeypatch, tmp_path):
  """The load test's child server runs in the repository root: an export path
  relative to the caller's directory still finds the export, and a server that
  exits at start-up is reported with its status and stderr, not as a timeout."""
  monkeypatch.chdir(tiny_reference_run["workdir"])
  with loadtest.ServerProcess("export", startup_timeout=120) as proc:
    assert request_url(proc.url + "/health")[0] == 200
  monkeypatch.chdir(tmp_path)
  with pytest.raises(RuntimeError, match=r"(?s)exited with status [1-9].*no_such_export: not a directory"):
    loadtest.ServerProcess("no_such_export", startup_timeout=120)


def test_load_test_reports_figures_with_no_errors(server):
  report = loadtest.run(server.url, clients=3, seconds=1.0, kind="mixed", texts_per_request=2)
  summary = report.summary()
  assert report.errors == 0, report.first_error
  assert report.requests > 3 and summary["requests_per_sec"] > 0
  assert 0 < summary["latency_p50_ms"] <= summary["latency_p99_ms"] <= summary["latency_max_ms"]
  assert "requests_per_sec" in report.table()
  assert 1 <= summary["forward_passes"] <= report.requests  # read from the server's /health
