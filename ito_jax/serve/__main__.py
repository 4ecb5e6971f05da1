"""python -m ito_jax.serve {embed,http,loadtest} ...

  embed     --export=DIR (--images FILE... | --texts=FILE) --out=OUT.npy
            image files, or a text file with one caption per line, to a float32
            [n, embed_dim] .npy (row i is input i; no pickle). A blank
            line in the text file is refused, naming its line number.
  http      --export=DIR [--host=127.0.0.1] [--port=8000] [limits...]
            the JSON embedding service (ito_jax/serve/http.py); prints
            "serving on URL" once ready; SIGTERM/SIGINT stop it.
  loadtest  (--export=DIR | --url=URL) [--clients=8] [--seconds=10] [--kind=mixed]
            a bounded load test (ito_jax/serve/loadtest.py); exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import numpy as np

from ito_jax import cli


def _read_texts(path: str) -> list[str]:
  """One caption per line. A blank line is refused rather than skipped: row i
  of the output is line i of the input, and a dropped line would shift every
  row after it onto the wrong caption."""
  with open(path, encoding="utf-8") as f:
    texts = [line.rstrip("\n") for line in f]
  for number, text in enumerate(texts, start=1):
    if not text.strip():
      raise SystemExit(f"embed: {path}, line {number} is blank; row i of the output is line i "
                       "of the input, so give every line a caption (or delete the line)")
  if not texts:
    raise SystemExit(f"embed: {path} is empty; give one caption per line")
  return texts


def _embed(args) -> int:
  from ito_jax import serve

  if bool(args.images) == bool(args.texts):
    raise SystemExit("embed: give exactly one of --images FILE... or --texts=FILE")
  texts = _read_texts(args.texts) if args.texts else None  # before the export loads
  embedder = serve.load(args.export, max_batch=args.max_batch)
  if args.images:
    embeddings = embedder.embed_images(args.images)
  else:
    embeddings = embedder.embed_texts(texts)
  np.save(args.out, embeddings.astype(np.float32), allow_pickle=False)
  print(f"wrote {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.out}")
  return 0


def _http(args) -> int:
  from ito_jax import serve
  from ito_jax.serve import http

  embedder = serve.load(args.export, max_batch=args.max_batch)
  if args.warmup:
    embedder.warmup()
  limits = http.Limits(max_body_bytes=args.max_body_bytes, max_items=args.max_items,
                       max_text_chars=args.max_text_chars, max_image_bytes=args.max_image_bytes,
                       max_image_pixels=args.max_image_pixels)
  server = http.EmbeddingServer(embedder, args.host, args.port, limits=limits,
                                max_wait_ms=args.max_wait_ms)

  def stop(signum, frame):
    del signum, frame
    # shutdown() returns once serve_forever has, so it runs beside it. Raising
    # KeyboardInterrupt here instead lands in whatever the main thread runs at
    # that moment: once in four SIGTERMs a weakref callback, which printed an
    # "Exception ignored" traceback.
    threading.Thread(target=server.shutdown, name="sigterm", daemon=True).start()

  signal.signal(signal.SIGTERM, stop)
  print(f"serving on {server.url}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:  # Ctrl-C
    pass
  finally:
    server.server_close()
  return 0


def _loadtest(args) -> int:
  from ito_jax.serve import loadtest

  if bool(args.export) == bool(args.url):
    raise SystemExit("loadtest: give exactly one of --export=DIR or --url=URL")
  server = loadtest.ServerProcess(args.export) if args.export else None
  try:
    url = server.url if server else args.url
    print(f"load test: {args.clients} clients for {args.seconds} s against {url} "
          f"({args.kind}: {args.texts_per_request} texts or {args.images_per_request} images "
          f"per request)", flush=True)
    try:
      report = loadtest.run(url, args.clients, args.seconds, args.kind, args.texts_per_request,
                            args.images_per_request)
    except ConnectionError as e:
      raise SystemExit(f"loadtest: {e}") from None
  finally:
    if server:
      server.stop()
  print(report.table())
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(report.summary(), f, indent=2)
  return 1 if report.errors else 0


def _int_in(low: int, high: int | None = None):
  """An argparse type: an integer in [low, high], else argparse's usage error."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
      raise argparse.ArgumentTypeError(
          f"{value} is out of range: expected {low} to {high}" if high is not None
          else f"{value} is out of range: expected at least {low}")
    return value
  return parse


POSITIVE = _int_in(1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ito_jax.serve", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("embed", help="embed image files or a text file into a .npy")
  p.add_argument("--export", required=True)
  p.add_argument("--images", nargs="+")
  p.add_argument("--texts")
  p.add_argument("--out", required=True)
  p.add_argument("--max_batch", type=POSITIVE, default=64)
  p.set_defaults(fn=_embed)

  p = sub.add_parser("http", help="serve embeddings over HTTP (JSON)")
  p.add_argument("--export", required=True)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="0 picks a free port")
  p.add_argument("--max_batch", type=POSITIVE, default=64, help="rows per forward pass")
  p.add_argument("--max_wait_ms", type=float, default=2.0,
                 help="how long a forward pass waits for more requests to join")
  p.add_argument("--max_items", type=POSITIVE, default=32, help="texts or images per request")
  p.add_argument("--max_body_bytes", type=POSITIVE, default=8 << 20)
  p.add_argument("--max_text_chars", type=POSITIVE, default=1000)
  p.add_argument("--max_image_bytes", type=POSITIVE, default=4 << 20)
  p.add_argument("--max_image_pixels", type=POSITIVE, default=4096 * 4096)
  p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                 help="compile every batch size before accepting requests")
  p.set_defaults(fn=_http)

  p = sub.add_parser("loadtest", help="bounded load test of the HTTP service")
  p.add_argument("--export", help="start a server on this export (child process)")
  p.add_argument("--url", help="or test a running server, e.g. http://127.0.0.1:8000")
  p.add_argument("--clients", type=POSITIVE, default=8)
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--kind", choices=("text", "image", "mixed"), default="mixed")
  p.add_argument("--texts_per_request", type=POSITIVE, default=4)
  p.add_argument("--images_per_request", type=POSITIVE, default=1)
  p.add_argument("--json_out", help="also write the figures here as JSON")
  p.set_defaults(fn=_loadtest)

  args = parser.parse_args(argv)
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(cli.exit_on_user_error(main))
