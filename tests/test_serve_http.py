"""The HTTP service over an export: answers equal to the Python API, shared
forward passes, each malformed request refused with a 4xx while the server
stays up, request batching, and a short load test."""

import http.client
import json
import socket
import threading
import urllib.parse

import numpy as np
import pytest

from serve_helpers import b64, png_bytes, preprocessing_only, random_images
from ito_jax import serve
from ito_jax.serve import http as serve_http
from ito_jax.serve import loadtest

pytestmark = pytest.mark.slow


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
      max_batch=4, embed_dim=2, image_size=8, preprocess_image=preprocessing_only(8).preprocess_image,
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
    preprocessing_only(8).preprocess_image(np.full((8, 8, 3), -3.0, np.float32))


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


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/embed/text", "POST"), ("GET", "/embed/image", "POST"), ("POST", "/health", "GET"),
    ("DELETE", "/embed/text", "POST"),
])
def test_a_known_path_asked_with_another_method_is_405_with_allow(modelless_server, method, path,
                                                                   allow):
  """Not 404 (the path exists): 405 naming the method to use, in Allow too."""
  host, port = modelless_server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  try:
    conn.request(method, path, body=b"{}" if method == "POST" else None)
    response = conn.getresponse()
    reply = json.loads(response.read())
  finally:
    conn.close()
  assert (response.status, response.getheader("Allow")) == (405, allow), reply
  assert f"{method} is not supported on {path!r}; use {allow} {path}" in reply["error"]
  assert request(modelless_server, "GET", "/health")[0] == 200
  if method not in ("GET", "POST"):  # on a path that does not exist, the path is what is wrong
    assert request(modelless_server, method, "/nope") == (404, {"error": "no such path '/nope'"})


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
  # Each client finished at least one request. Not more: without warm-up a new
  # batch size compiles mid-test, and on a loaded machine the first round alone
  # took 1.2 s of the 1 s window (3 requests; `> 3` failed there).
  assert report.requests >= 3 and summary["requests_per_sec"] > 0
  assert 0 < summary["latency_p50_ms"] <= summary["latency_p99_ms"] <= summary["latency_max_ms"]
  assert "requests_per_sec" in report.table()
  assert 1 <= summary["forward_passes"] <= report.requests  # read from the server's /health
