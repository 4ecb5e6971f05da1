"""A bounded load test of the HTTP embedding service on loopback.

  python -m ito_jax.serve loadtest --export=DIR --clients=8 --seconds=10

N client threads, each on its own keep-alive connection, send requests back to
back for a fixed time: text requests (`--texts_per_request` captions), image
requests (`--images_per_request` PNGs) or both alternately (`--kind=mixed`).
With `--export` the server runs in a child process (so clients and server do
not share one interpreter lock), started on a free port and ended by its PID;
with `--url` an already running server is used. Every request has a timeout,
and a response counts as an error unless it is a 200 with one embedding per
input. Reports requests/s, items/s and latency percentiles. Nothing listening
at --url fails at once, and a server that stops listening mid-run ends it.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
from PIL import Image

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")


def make_payloads(kind: str, texts_per_request: int, images_per_request: int,
                  count: int = 16, seed: int = 0) -> list[tuple[str, bytes, int]]:
  """(path, body, number of items) for `count` distinct requests of `kind`."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    if kind == "text" or (kind == "mixed" and i % 2 == 0):
      texts = [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}"
               for _ in range(texts_per_request)]
      out.append(("/embed/text", json.dumps({"texts": texts}).encode(), len(texts)))
    else:
      images = []
      for _ in range(images_per_request):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
      out.append(("/embed/image", json.dumps({"images": images}).encode(), len(images)))
  return out


@dataclasses.dataclass
class Report:
  clients: int
  seconds: float
  requests: int
  errors: int
  items: int
  latencies_ms: list
  first_error: str = ""
  forward_passes: int | None = None  # model calls the server made meanwhile (from /health)

  @property
  def requests_per_sec(self) -> float:
    return self.requests / self.seconds

  def percentile(self, q: float) -> float:
    return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

  def summary(self) -> dict:
    return {"clients": self.clients, "seconds": round(self.seconds, 2), "requests": self.requests,
            "errors": self.errors, "requests_per_sec": round(self.requests_per_sec, 1),
            "items_per_sec": round(self.items / self.seconds, 1),
            "latency_p50_ms": round(self.percentile(50), 2),
            "latency_p99_ms": round(self.percentile(99), 2),
            "latency_max_ms": round(max(self.latencies_ms, default=float("nan")), 2),
            "forward_passes": self.forward_passes,
            "requests_per_pass": (round(self.requests / self.forward_passes, 2)
                                  if self.forward_passes else None)}

  def table(self) -> str:
    s = self.summary()
    lines = [f"{k:<16} {v}" for k, v in s.items()]
    if self.first_error:
      lines.append(f"{'first_error':<16} {self.first_error}")
    return "\n".join(lines)


def _forward_passes(host: str, port: int) -> int | None:
  try:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    batches = json.loads(conn.getresponse().read()).get("batches", {})
    conn.close()
    return sum(batches.values())
  except (OSError, http.client.HTTPException, ValueError, AttributeError):
    return None


def run(url: str, clients: int = 8, seconds: float = 10.0, kind: str = "mixed",
        texts_per_request: int = 4, images_per_request: int = 1,
        request_timeout: float = 30.0) -> Report:
  """Drives the server at `url` with `clients` threads for `seconds`.

  Raises ConnectionError at once when nothing listens at `url`; a refused
  connection mid-run (the server went away) ends every client early, the
  refusal reported as the first error."""
  if kind not in ("text", "image", "mixed"):
    raise ValueError(f"kind must be text|image|mixed, got {kind!r}")
  parsed = urllib.parse.urlsplit(url)
  try:  # thousands of refused requests over the whole run would say less
    socket.create_connection((parsed.hostname, parsed.port or 80), timeout=request_timeout).close()
  except OSError as e:
    raise ConnectionError(f"cannot connect to {url} ({e}); is the server running? Start one "
                          "with `python -m ito_jax.serve http --export=DIR`, or pass --export=DIR "
                          "to start it here") from None
  payloads = make_payloads(kind, texts_per_request, images_per_request)
  lock = threading.Lock()
  latencies, counts, first_error = [], {"requests": 0, "errors": 0, "items": 0}, []
  stop_at = time.monotonic() + seconds
  refused = threading.Event()  # the server stopped listening: no client goes on

  def client(index: int):
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=request_timeout)
    i = index
    while time.monotonic() < stop_at and not refused.is_set():
      path, body, n = payloads[i % len(payloads)]
      i += 1
      start = time.perf_counter()
      error = ""
      try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
          error = f"HTTP {response.status}: {data[:200]!r}"
        elif len(json.loads(data)["embeddings"]) != n:
          error = "wrong number of embeddings"
      except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        error = f"{type(e).__name__}: {e}"
        if isinstance(e, ConnectionRefusedError):
          error = f"{error} (the server at {url} stopped listening; the load test ends here)"
          refused.set()
        conn.close()
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=request_timeout)
      elapsed_ms = (time.perf_counter() - start) * 1000
      with lock:
        counts["requests"] += 1
        if error:
          counts["errors"] += 1
          if not first_error:
            first_error.append(error)
        else:
          counts["items"] += n
          latencies.append(elapsed_ms)
    conn.close()

  passes_before = _forward_passes(parsed.hostname, parsed.port)
  started = time.monotonic()
  threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=seconds + request_timeout + 5)
  elapsed = time.monotonic() - started
  passes_after = _forward_passes(parsed.hostname, parsed.port)
  passes = (passes_after - passes_before
            if passes_before is not None and passes_after is not None else None)
  return Report(clients, elapsed, counts["requests"], counts["errors"], counts["items"], latencies,
                first_error[0] if first_error else "", passes)


class ServerProcess:
  """`python -m ito_jax.serve http` in a child process on a free loopback port."""

  def __init__(self, export_dir: str, startup_timeout: float = 300.0, extra_args=()):
    if "://" not in export_dir:  # the child runs in the repository root, not our directory
      export_dir = os.path.abspath(export_dir)
    self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing reads it while serving
    self.process = subprocess.Popen(
        [sys.executable, "-m", "ito_jax.serve", "http", f"--export={export_dir}", "--port=0",
         *extra_args],
        stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    self.url = None
    deadline = time.monotonic() + startup_timeout
    watchdog = threading.Timer(startup_timeout, self.process.kill)  # bounds the readline below
    watchdog.start()
    try:
      for line in self.process.stdout:  # the server prints "serving on URL" once it is ready
        if line.startswith("serving on "):
          self.url = line.split()[-1]
          break
    finally:
      watchdog.cancel()
    if self.url is None or time.monotonic() > deadline:
      try:  # stdout ends just before the process does: give it a moment to exit
        exited = self.process.wait(timeout=10) if self.url is None else self.process.poll()
      except subprocess.TimeoutExpired:
        exited = None
      if exited is not None:
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:]
      self.stop()
      if exited is not None and time.monotonic() <= deadline:
        raise RuntimeError(f"the server exited with status {exited} before serving:\n{tail}")
      raise RuntimeError(f"the server did not start within {startup_timeout} s")

  def stop(self):
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.process.stdout.close()
    self.stderr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
    return False
