"""ito_jax vs open_clip: the train step on the `bench_s` shape, same batch, same threads.

Run through `benchmarks/openclip_side_by_side.sh`, which builds open_clip's own
virtual environment (benchmarks/.venv-openclip; a benchmark dependency only)
and calls this file as the driver:

  python benchmarks/openclip_side_by_side.py --openclip_python=benchmarks/.venv-openclip/bin/python

The driver starts two long-lived workers, one per framework, each in its own
environment (this file again, with --worker=ito_jax or --worker=openclip).
Each builds its model, optimizer and a fixed random batch, warms up (and
compiles), then waits. The driver then alternates: `--steps` timed steps of
one, then of the other, for `--rounds` rounds, so load from the shared machine
hits both alike; only one worker computes at a time. It prints per-round
examples/s, the medians and their ratio.

Shape (configs/bench_s.py): vision image 128, patch 16, width 384, depth 6,
heads 6, MLP 4x; text context 32, vocab 8192, width 256, depth 4, heads 4;
embed 256; softmax CLIP loss; AdamW with global-norm clipping at 1.0; float32.
Differences that remain (they favour open_clip slightly or are neutral): open_clip's
ViT has a class token (65 tokens, not 64) and a pre-LayerNorm; its text tower is
causally masked (ito_jax: padding mask). Compute per example differs by ~2%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =============================================================================
# Workers: build, warm up, then answer "N" on stdin with N step times as JSON
# =============================================================================
def _serve(run_steps) -> None:
  print("READY", flush=True)
  for line in sys.stdin:
    n = int(line)
    if n <= 0:
      return
    print(json.dumps(run_steps(n)), flush=True)


def pin_to_cores(threads: int) -> list[int]:
  """Limits this process to its first `threads` allowed cores, before jax or
  torch starts a thread pool. XLA:CPU has no flag for its intra-op pool size
  (it sizes it from the cores it may use), so affinity is what holds both
  frameworks to the same count. Returns the cores kept."""
  allowed = sorted(os.sched_getaffinity(0))
  if threads > len(allowed):
    raise SystemExit(f"--threads={threads}: this process may use only {len(allowed)} cores {allowed}")
  keep = allowed[:threads]
  os.sched_setaffinity(0, keep)
  return keep


def worker_ito_jax(args) -> None:
  cores = pin_to_cores(args.threads)  # before jax sizes its thread pool
  print(f"INFO cores={cores}", flush=True)
  sys.path.insert(0, REPO)
  import jax  # noqa: F401
  from configs import bench_s
  from ito_jax import bench
  config = bench_s.get_config()
  config.batch_size = args.batch_size
  for override in args.ito_override:
    key, value = override.split("=", 1)
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  t0 = time.perf_counter()
  step = bench.CompiledStep(config)
  print(f"INFO compile_s={time.perf_counter() - t0:.2f} params={step.params}", flush=True)
  step.run(args.warmup)
  _serve(step.run)


def _import_openclip_model():
  """open_clip's model and loss modules, without its package __init__.

  open_clip's __init__ imports its image transforms, which need torchvision,
  and PyPI's torchvision does not load beside the CPU torch wheel used here.
  The model code needs torchvision only for FrozenBatchNorm2d (freezing ResNet
  towers, unused here), so that one name gets a placeholder and the package
  is entered below its __init__. Everything timed is open_clip's own code."""
  import importlib.util
  import types
  spec = importlib.util.find_spec("open_clip")
  pkg_dir = os.path.dirname(spec.origin)
  pkg = types.ModuleType("open_clip")
  pkg.__path__ = [pkg_dir]
  sys.modules["open_clip"] = pkg
  if importlib.util.find_spec("torchvision") is None:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")

    class FrozenBatchNorm2d:  # placeholder; only ResNet freezing would use it
      def __init__(self, *a, **k):
        raise RuntimeError("torchvision is not installed in this benchmark venv")

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    tv.ops, ops.misc = ops, misc
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
  import importlib
  model = importlib.import_module("open_clip.model")
  loss = importlib.import_module("open_clip.loss")
  version = importlib.import_module("open_clip.version").__version__
  return model, loss, version


def worker_openclip(args) -> None:
  pin_to_cores(args.threads)
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model_lib, loss_lib, version = _import_openclip_model()
  vision = model_lib.CLIPVisionCfg(layers=6, width=384, head_width=64, mlp_ratio=4.0,
                                   patch_size=16, image_size=128, pool_type="avg")
  text = model_lib.CLIPTextCfg(context_length=32, vocab_size=8192, width=256, heads=4,
                               layers=4, mlp_ratio=4.0)
  model = model_lib.CLIP(embed_dim=256, vision_cfg=vision, text_cfg=text, output_dict=True)
  model.train()
  params = sum(p.numel() for p in model.parameters())
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  loss_fn = loss_lib.ClipLoss()
  rng = np.random.default_rng(0)
  b = args.batch_size
  images = torch.from_numpy(rng.uniform(-1, 1, (b, 3, 128, 128)).astype(np.float32))
  tokens = rng.integers(3, 8192, size=(b, 32)).astype(np.int64)
  tokens[:, 16:] = 0
  tokens[:, 15] = 8191  # EOS: open_clip's argmax pooling picks the largest id
  tokens = torch.from_numpy(tokens)

  def one_step():
    opt.zero_grad(set_to_none=True)
    out = model(images, tokens)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, 4.6052)
    return loss

  step = torch.compile(one_step) if args.torch_compile else one_step
  t0 = time.perf_counter()
  step()
  print(f"INFO open_clip={version} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"first_step_s={time.perf_counter() - t0:.2f} params={params} "
        f"torch_compile={args.torch_compile}", flush=True)

  def run(n):
    times = []
    for _ in range(n):
      t = time.perf_counter()
      step().item()  # the loss on the host: the step has finished
      times.append(time.perf_counter() - t)
    return times

  for _ in range(args.warmup):
    step()
  _serve(run)


# =============================================================================
# Driver
# =============================================================================
class Worker:

  def __init__(self, name, python, args, env):
    cmd = [python, os.path.abspath(__file__), f"--worker={name}",
           f"--batch_size={args.batch_size}", f"--threads={args.threads}",
           f"--warmup={args.warmup}"]
    cmd += [f"--ito_override={o}" for o in args.ito_override]
    if args.torch_compile:
      cmd.append("--torch_compile")
    self.name = name
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True, cwd=REPO)
    self.info = []
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"{name} worker exited before it was ready (rc={self.proc.wait()})")
      if line.startswith("READY"):
        break
      if line.startswith("INFO"):
        self.info.append(line[5:].strip())

  def run(self, steps):
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.name} worker died (rc={self.proc.wait()})")
    return json.loads(line)

  def close(self):
    try:
      self.proc.stdin.write("0\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=30)
    except Exception:  # noqa: BLE001
      self.proc.kill()  # our own child, by its handle
      self.proc.wait()


def driver(args) -> None:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    env[var] = str(args.threads)
  env["JAX_PLATFORMS"] = "cpu"
  workers = []
  try:
    ours = Worker("ito_jax", args.ito_python, args, env)
    workers.append(ours)
    theirs = Worker("openclip", args.openclip_python, args, env)
    workers.append(theirs)
    print(f"ito_jax: {'; '.join(ours.info)}  overrides: {args.ito_override or 'none'}")
    print(f"open_clip: {'; '.join(theirs.info)}")
    print(f"batch {args.batch_size}, threads {args.threads}, {args.rounds} rounds x {args.steps} steps, "
          "alternating")
    ex = {"ito_jax": [], "openclip": []}
    for r in range(args.rounds):
      order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
      row = {}
      for w in order:
        med = statistics.median(w.run(args.steps))
        ex[w.name].append(args.batch_size / med)
        row[w.name] = ex[w.name][-1]
      print(f"round {r + 1}: ito_jax {row['ito_jax']:.1f} ex/s  open_clip {row['openclip']:.1f} ex/s  "
            f"ratio {row['ito_jax'] / row['openclip']:.3f}", flush=True)
    a, b = statistics.median(ex["ito_jax"]), statistics.median(ex["openclip"])
    ratios = [x / y for x, y in zip(ex["ito_jax"], ex["openclip"])]
    print(f"median examples/s: ito_jax {a:.1f}  open_clip {b:.1f}")
    print(f"ratio of medians (ito_jax / open_clip): {a / b:.3f}")
    print(f"median per-round ratio: {statistics.median(ratios):.3f}  "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
  finally:
    for w in workers:
      w.close()


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", choices=("ito_jax", "openclip"), default=None)
  p.add_argument("--ito_python", default=sys.executable)
  p.add_argument("--openclip_python", default=os.path.join(REPO, "benchmarks/.venv-openclip/bin/python"))
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--steps", type=int, default=3, help="timed steps per framework per round")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--torch_compile", action="store_true", help="wrap open_clip's step in torch.compile")
  p.add_argument("--ito_override", action="append", default=[],
                 help="config override for ito_jax, e.g. model.attention=einsum (repeatable)")
  args = p.parse_args()
  if args.worker == "ito_jax":
    worker_ito_jax(args)
  elif args.worker == "openclip":
    worker_openclip(args)
  else:
    driver(args)


if __name__ == "__main__":
  main()
