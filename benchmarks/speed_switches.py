"""Each speed switch on and off, on one shape, alternating rounds; and compile
time against depth with scanned layers on and off.

  python benchmarks/speed_switches.py                       # bench_s towers, batch 32
  python benchmarks/speed_switches.py --batch_size=128 --rounds=5
  python benchmarks/speed_switches.py --only=compile_depth  # the depth sweep alone
  python benchmarks/speed_switches.py --only=accumulation   # memory levers: microbatches vs remat
  python benchmarks/speed_switches.py --only=patch_dropout  # FLIP: 50% / 75% of the patches dropped

Every variant is compiled first, then the variants take turns (`--steps`
timed steps each, `--rounds` rounds) so load on a shared machine hits all
alike; the table has the median step time over all rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from configs import bench_s  # noqa: E402
from ito_jax import bench  # noqa: E402

# name -> config overrides (dotted keys), against the f32 / no remat / loop / donate / einsum baseline
BASELINE = "baseline (f32, no remat, loop, donate, einsum attention)"
VARIANTS = {
    BASELINE: {},
    "bf16 compute, f32 params+opt": {"model.dtype": "bfloat16"},
    "remat=full": {"model.remat": "full"},
    "remat=dots": {"model.remat": "dots"},
    "scan_layers": {"model.scan_layers": True},
    "donate=False": {"model.donate": False},
    "attention=xla (jax.nn.dot_product_attention)": {"model.attention": "xla"},
}
# The memory levers: towers in A microbatches (optim.accumulation_steps, the
# same gradient) against recomputing each block in the backward pass.
ACCUMULATION = {
    BASELINE: {},
    "remat=full": {"model.remat": "full"},
    **{f"accumulation_steps={a}": {"optim.accumulation_steps": a} for a in (2, 4, 8)},
}
# Patch dropout changes what is trained (the image tower sees a token
# subset), so it is raced on its own, not among the switches above.
PATCH_DROPOUT = {
    BASELINE: {},
    **{f"patch_dropout={r}": {"model.image.patch_dropout": r} for r in (0.5, 0.75)},
}
GROUPS = {"accumulation": ACCUMULATION, "patch_dropout": PATCH_DROPOUT}


def variant(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def switches(base, steps, rounds, variants=VARIANTS):
  compiled = {}
  for name, overrides in variants.items():
    compiled[name] = bench.CompiledStep(variant(base, overrides))
    compiled[name].run(1)
    first = statistics.median(compiled[name].run(steps))  # a first figure, before the rounds
    print(f"{name}: compile {compiled[name].compile_s:.1f} s, first step median {first:.3f} s",
          flush=True)
  times = {name: [] for name in compiled}
  for r in range(rounds):
    names = list(compiled) if r % 2 == 0 else list(compiled)[::-1]
    for name in names:
      times[name] += compiled[name].run(steps)
  base_med = statistics.median(times[next(iter(compiled))])
  print("\n| switch | compile s | step s (median) | examples/s | vs baseline | compiled temp MiB |")
  print("|---|---|---|---|---|---|")
  for name, step in compiled.items():
    med = statistics.median(times[name])
    mem = step.compiled.memory_analysis()
    temp = f"{mem.temp_size_in_bytes / 2**20:.0f}" if mem is not None else "n/a"
    print(f"| {name} | {step.compile_s:.1f} | {med:.3f} | {base.batch_size / med:.1f} | "
          f"{base_med / med:.2f}x | {temp} |", flush=True)


def compile_depth(base, depths):
  print("\n| depth (image = text) | compile s, loop | compile s, scan |")
  print("|---|---|---|")
  for depth in depths:
    row = []
    for scan in (False, True):
      c = variant(base, {"model.scan_layers": scan})
      c.model.image.depth = c.model.text.depth = depth
      row.append(bench.CompiledStep(c).compile_s)
    print(f"| {depth} | {row[0]:.1f} | {row[1]:.1f} |", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--depth", type=int, default=0, help="override both towers' depth (0: bench_s's 6/4)")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--depths", default="2,4,8,16")
  p.add_argument("--only", choices=("switches", "compile_depth", *GROUPS), default=None,
                 help="one part (default: switches, then compile_depth)")
  args = p.parse_args()
  base = bench_s.get_config()
  base.batch_size = args.batch_size
  base.model.image.image_size = args.image_size
  if args.depth:
    base.model.image.depth = base.model.text.depth = args.depth
  print(f"shape: bench_s widths, depth {base.model.image.depth}/{base.model.text.depth}, "
        f"batch {base.batch_size}, image {base.model.image.image_size}")
  if args.only in (None, "switches"):
    switches(base, args.steps, args.rounds)
  if args.only in GROUPS:
    switches(base, args.steps, args.rounds, GROUPS[args.only])
  if args.only in (None, "compile_depth"):
    compile_depth(base, [int(d) for d in args.depths.split(",")])


if __name__ == "__main__":
  main()
