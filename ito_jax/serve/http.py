"""A JSON embedding service over the standard library's threading HTTP server.

  python -m ito_jax.serve http --export=DIR [--port=8000] [--host=127.0.0.1]

  GET  /health       -> {"status": "ok", "embed_dim", "image_size", "limits": {...}}
  POST /embed/text   {"texts": ["a red circle", ...]}         -> {"embeddings": [[...], ...]}
  POST /embed/image  {"images": ["<base64 PNG/JPEG>", ...]}   -> {"embeddings": [[...], ...]}

Each connection is served by its own thread, which parses and validates the
request (JSON, base64, image decoding, limits) and hands the preprocessed items
to a Batcher. The Batcher's single model thread merges items of concurrent
requests into one forward pass of up to `max_batch` rows, waiting at most
`max_wait_ms` for company, so throughput grows with concurrency while the
model is only ever called from one thread.

Bad requests get a 4xx JSON {"error": "..."} naming the field and the problem
(a path asked with the wrong method: 405 with an Allow header); the server
keeps serving. Limits: request body bytes, items per request,
characters per text, bytes and pixels per image.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import queue
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from absl import logging

from ito_jax import serve
from ito_jax.data import records


@dataclasses.dataclass(frozen=True)
class Limits:
  max_body_bytes: int = 8 << 20  # whole request body
  max_items: int = 32  # texts or images per request (<= the batcher's max_batch)
  max_text_chars: int = 1000
  max_image_bytes: int = 4 << 20  # one decoded-from-base64 image file
  max_image_pixels: int = 4096 * 4096  # width x height, checked before decoding pixels


DRAIN_BYTES = 64 << 20  # an oversized body is read and dropped up to this size, then cut off


class RequestError(Exception):
  """A client error: HTTP status and a message for the client."""

  def __init__(self, status: HTTPStatus, message: str, headers: dict | None = None):
    super().__init__(message)
    self.status = status
    self.headers = headers or {}


# =============================================================================
# Batching concurrent requests into one forward pass
# =============================================================================
class _Job:
  __slots__ = ("items", "done", "result", "error")

  def __init__(self, items: np.ndarray):
    self.items = items  # [n, ...] preprocessed rows
    self.done = threading.Event()
    self.result = None
    self.error = None


class Batcher:
  """submit(rows) -> embeddings, from any thread; one model thread runs
  `fn` on the concatenation of waiting jobs (whole jobs, <= max_batch rows)."""

  def __init__(self, fn, max_batch: int, max_wait_ms: float = 2.0, name: str = "batcher"):
    self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
    self._queue: queue.Queue = queue.Queue()
    self.batches = 0  # forward passes run
    self.largest_batch = 0  # most rows in one pass
    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
    self._thread.start()

  def submit(self, items: np.ndarray, timeout: float = 60.0) -> np.ndarray:
    if len(items) > self.max_batch:
      raise ValueError(f"{len(items)} rows exceed max_batch {self.max_batch}")
    job = _Job(items)
    self._queue.put(job)
    if not job.done.wait(timeout):
      raise TimeoutError(f"no result within {timeout} s")
    if job.error is not None:
      raise job.error
    return job.result

  def close(self) -> None:
    self._queue.put(_STOP)
    self._thread.join(timeout=10)

  def _loop(self) -> None:
    pending = None  # a job that did not fit the previous pass
    while True:
      job = pending if pending is not None else self._queue.get()
      pending = None
      if job is _STOP:
        return
      jobs, rows = [job], len(job.items)
      deadline = time.monotonic() + self.max_wait
      while rows < self.max_batch:
        try:
          nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if nxt is _STOP or rows + len(nxt.items) > self.max_batch:
          pending = nxt
          break
        jobs.append(nxt)
        rows += len(nxt.items)
      self._run(jobs, rows)

  def _run(self, jobs: list, rows: int) -> None:
    try:
      out = self.fn(np.concatenate([j.items for j in jobs]))
      self.batches += 1
      self.largest_batch = max(self.largest_batch, rows)
      start = 0
      for j in jobs:
        j.result = out[start:start + len(j.items)]
        start += len(j.items)
    except Exception as e:  # reported to every waiting request; the loop goes on
      logging.exception("batcher: model call failed")
      for j in jobs:
        j.error = e
    for j in jobs:
      j.done.set()


_STOP = object()


# =============================================================================
# Request parsing and validation
# =============================================================================
def _items(body: dict, field: str, limits: Limits) -> list:
  if not isinstance(body, dict):
    raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object with a {field!r} list")
  if field not in body:
    raise RequestError(HTTPStatus.BAD_REQUEST, f"missing field {field!r}")
  items = body[field]
  if not isinstance(items, list):
    raise RequestError(HTTPStatus.BAD_REQUEST, f"{field!r} must be a list, got {type(items).__name__}")
  if not items:
    raise RequestError(HTTPStatus.BAD_REQUEST, f"{field!r} is empty")
  if len(items) > limits.max_items:
    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"{len(items)} {field} exceed the limit of {limits.max_items} per request")
  for i, item in enumerate(items):
    if not isinstance(item, str):
      raise RequestError(HTTPStatus.BAD_REQUEST, f"{field}[{i}] must be a string, got {type(item).__name__}")
  return items


def parse_texts(body, embedder: serve.Embedder, limits: Limits) -> np.ndarray:
  texts = _items(body, "texts", limits)
  try:
    serve.check_texts(texts)
  except serve.InputError as e:
    raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
  for i, text in enumerate(texts):
    if len(text) > limits.max_text_chars:
      raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"texts[{i}] has {len(text)} characters; the limit is {limits.max_text_chars}")
  return embedder.tokenize(texts)


def decode_image(encoded: str, name: str, embedder: serve.Embedder, limits: Limits) -> np.ndarray:
  if len(encoded) > 4 * (limits.max_image_bytes // 3 + 1):
    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"{name} is over the limit of {limits.max_image_bytes} bytes")
  try:
    data = base64.b64decode(encoded, validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} is not valid base64 ({e})") from e
  try:
    # The decoding training and evaluation use, with this server's pixel limit
    # checked on the header before any pixel is decoded.
    pixels, _ = records.decode_image(data, limits.max_image_pixels)
  except records.BadRecord as e:
    if e.kind == "image_too_large":
      raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{name} is too large: {e.detail}") from e
    raise RequestError(HTTPStatus.BAD_REQUEST,
                       f"{name} is not a decodable image (PNG, JPEG, ...): {e}") from e
  try:
    return embedder.preprocess_image(pixels, name)
  except serve.InputError as e:
    raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from e


def parse_images(body, embedder: serve.Embedder, limits: Limits) -> np.ndarray:
  images = _items(body, "images", limits)
  return np.stack([decode_image(x, f"images[{i}]", embedder, limits) for i, x in enumerate(images)])


# =============================================================================
# The server
# =============================================================================
class EmbeddingServer(ThreadingHTTPServer):
  daemon_threads = True
  # Connections the kernel queues before accept(): socketserver's default of 5
  # reset the sixth of a burst of new clients.
  request_queue_size = 128

  def __init__(self, embedder: serve.Embedder, host: str = "127.0.0.1", port: int = 8000,
               limits: Limits = Limits(), max_wait_ms: float = 2.0):
    if limits.max_items > embedder.max_batch:
      raise ValueError(f"limits.max_items {limits.max_items} exceeds the embedder's max_batch "
                       f"{embedder.max_batch}")
    self.embedder, self.limits = embedder, limits
    self.batchers = {
        "text": Batcher(embedder.embed_tokens, embedder.max_batch, max_wait_ms, "text-batcher"),
        "image": Batcher(embedder.embed_preprocessed_images, embedder.max_batch, max_wait_ms,
                         "image-batcher")}
    super().__init__((host, port), _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def server_close(self):
    super().server_close()
    for b in self.batchers.values():
      b.close()


# The method each path answers; another method on it is 405 with an Allow header.
METHODS = {"/health": "GET", "/embed/text": "POST", "/embed/image": "POST"}


def _wrong_method(method: str, path: str) -> RequestError:
  """405 for `method` on `path`, one of METHODS' paths."""
  allowed = METHODS[path]
  return RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported on {path!r}; "
                      f"use {allowed} {path}", headers={"Allow": allowed})


class _Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
  # Headers and body go out in two writes; with Nagle on, the body waits for the
  # client's delayed ACK (~40 ms per request on Linux).
  disable_nagle_algorithm = True
  timeout = 30  # seconds a client may stall mid-request before the socket closes
  server: EmbeddingServer

  def log_message(self, format, *args):  # noqa: A002 (the base class's name)
    logging.debug("%s " + format, self.address_string(), *args)

  def _reply(self, status: HTTPStatus, payload: dict, close: bool = False,
             headers: dict | None = None) -> None:
    body = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    self.send_header("Content-Length", str(len(body)))
    if close:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    if self.path in METHODS and METHODS[self.path] != "GET":
      e = _wrong_method("GET", self.path)
      return self._reply(e.status, {"error": str(e)}, headers=e.headers)
    if self.path != "/health":
      return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
    e = self.server.embedder
    self._reply(HTTPStatus.OK, {"status": "ok", "embed_dim": e.embed_dim, "image_size": e.image_size,
                                "limits": dataclasses.asdict(self.server.limits),
                                "batches": {k: b.batches for k, b in self.server.batchers.items()}})

  def do_POST(self):
    kinds = {"/embed/text": ("text", parse_texts), "/embed/image": ("image", parse_images)}
    try:
      raw = self._read_body()
      if self.path in METHODS and self.path not in kinds:
        raise _wrong_method("POST", self.path)
      if self.path not in kinds:
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; "
                                                 f"POST /embed/text or /embed/image")
      try:
        body = json.loads(raw)
      except ValueError as e:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is
        # Python's refusal of an integer literal over 4300 digits.
        raise RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}") from None
      except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           "malformed JSON: nested too deeply for the parser") from None
      kind, parse = kinds[self.path]
      rows = parse(body, self.server.embedder, self.server.limits)
      embeddings = self.server.batchers[kind].submit(rows)
    except RequestError as e:
      return self._reply(e.status, {"error": str(e)}, close=True, headers=e.headers)
    except Exception as e:  # a server fault; the request fails, the server stays up
      logging.exception("request failed")
      return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
    self._reply(HTTPStatus.OK, {"embeddings": np.asarray(embeddings, np.float32).tolist()})

  def _content_length(self) -> int:
    length = self.headers.get("Content-Length")
    if length is None:
      raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required")
    try:
      value = int(length)
    except ValueError:
      value = -1
    if value < 0:
      raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
    return value

  def _read_body(self) -> bytes:
    length = self._content_length()
    if length > self.server.limits.max_body_bytes:
      self._discard(length)
      raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"request body of {length} bytes exceeds the limit of "
                         f"{self.server.limits.max_body_bytes}")
    try:
      body = self.rfile.read(length)
    except TimeoutError:
      raise RequestError(HTTPStatus.REQUEST_TIMEOUT,
                         f"the {length}-byte body (Content-Length) did not arrive within "
                         f"{self.timeout} s") from None
    if len(body) < length:
      raise RequestError(HTTPStatus.BAD_REQUEST,
                         f"the body ended after {len(body)} of {length} bytes (Content-Length)")
    return body

  def _discard(self, length: int) -> None:
    """Reads and drops up to DRAIN_BYTES of a body we refuse: closing a socket
    with unread data resets it, and the client would never see our reply."""
    left = min(length, DRAIN_BYTES)
    while left > 0:
      try:
        chunk = self.rfile.read(min(left, 1 << 16))
      except TimeoutError:  # the client stopped sending; the reply closes the connection
        return
      if not chunk:
        return
      left -= len(chunk)

  def _method_not_allowed(self):
    try:
      self._discard(self._content_length())
    except RequestError:
      pass
    if self.path not in METHODS:  # no method answers there: the path is what is wrong
      return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"}, close=True)
    e = _wrong_method(self.command, self.path)
    self._reply(e.status, {"error": str(e)}, close=True, headers=e.headers)

  do_PUT = do_DELETE = do_PATCH = _method_not_allowed


def start(embedder: serve.Embedder, host: str = "127.0.0.1", port: int = 0, **kwargs):
  """Starts a server in a background thread; returns it (`.url`; stop with
  `.shutdown(); .server_close()`). Port 0 picks a free port."""
  server = EmbeddingServer(embedder, host, port, **kwargs)
  threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
  return server
