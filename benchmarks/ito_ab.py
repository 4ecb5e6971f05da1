"""ito_jax against itself: bench_s train steps under different config overrides
or XLA flags, in alternating rounds, so host drift hits every variant alike.

  python benchmarks/ito_ab.py --variant= --variant=model.attention=xla
  python benchmarks/ito_ab.py --variant= --variant='xla:--xla_cpu_experimental_xnn_fusion_type=dot'

Each --variant is a comma-separated list of config overrides (key=value, as in
openclip_side_by_side.py --ito_override) and at most one `xla:FLAGS` item; an
empty one is the default config. Every variant runs in its own long-lived
worker process (openclip_side_by_side.py --worker=ito_jax, so its XLA_FLAGS
apply), compiled and warmed up before the first round; only one computes at a
time. Prints examples/s per round and, for each variant, the median and the
median per-round ratio against the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text: str) -> tuple[str, list[str]]:
  """'a.b=1,xla:--flag=x' -> ('--flag=x', ['a.b=1'])."""
  flags, overrides = "", []
  for item in filter(None, text.split(",")):
    if item.startswith("xla:"):
      flags = item[len("xla:"):]
    elif "=" in item:
      overrides.append(item)
    else:
      raise SystemExit(f"--variant: {item!r} is neither key=value nor xla:FLAGS")
  return flags, overrides


def start(flags: str, overrides: list[str], args) -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=true".strip()
  cmd = [sys.executable, os.path.join(REPO, "benchmarks/openclip_side_by_side.py"), "--worker=ito_jax",
         f"--batch_size={args.batch_size}", f"--warmup={args.warmup}",
         f"--threads={args.threads}"]  # the worker pins itself to that many cores
  cmd += [f"--ito_override={o}" for o in overrides]
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
  for line in proc.stdout:
    if line.startswith("INFO"):
      print(f"[{flags or 'default flags'} {overrides}] {line.strip()}", flush=True)
    if line.strip() == "READY":
      return proc
  raise SystemExit(f"worker {overrides} {flags!r} exited before it was ready (rc {proc.wait()})")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", action="append", required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args()
  variants = [parse_variant(v) for v in args.variant]
  workers = [start(flags, overrides, args) for flags, overrides in variants]
  rates = [[] for _ in variants]
  try:
    for r in range(args.rounds):
      for i, proc in enumerate(workers):
        proc.stdin.write(f"{args.steps}\n")
        proc.stdin.flush()
        times = json.loads(proc.stdout.readline())
        rates[i].append(args.batch_size / statistics.median(times))
      print(f"round {r + 1}: " + "  ".join(f"{x[-1]:.1f}" for x in rates) + " examples/s", flush=True)
  finally:
    for proc in workers:
      if proc.poll() is None:
        proc.stdin.write("0\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
  for (flags, overrides), x in zip(variants, rates):
    ratio = statistics.median(b / a for a, b in zip(rates[0], x))
    print(f"{str(overrides or 'default'):40s} {flags or '':45s} median {statistics.median(x):.2f} "
          f"examples/s, median per-round ratio vs the first {ratio:.3f}")


if __name__ == "__main__":
  main()
