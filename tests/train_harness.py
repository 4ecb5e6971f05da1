"""`python -m ito_jax.main` with test-only timing hooks, so a test can kill a
run at a chosen moment. Neither hook changes what is computed.

  ITO_TEST_STEP_DELAY=0.1        sleep this long before each training step
  ITO_TEST_PAUSE_AFTER_STEPS=5   after this many steps (of this process), write
                                 WORKDIR/paused and block before the next one;
                                 background checkpoint writes carry on meanwhile
  ITO_TEST_HOLD_SAVE_STEP=8      when saving this step, write WORKDIR/save_held
                                 and block inside the save (the checkpoint is
                                 then half written, in orbax's temporary directory)

  python tests/train_harness.py --config=... --workdir=...
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
from absl import app  # noqa: E402

from ito_jax import main, sharding  # noqa: E402


def _workdir() -> str:
  return next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))


def install_hooks():
  delay = float(os.environ.get("ITO_TEST_STEP_DELAY", "0"))
  pause_after = int(os.environ.get("ITO_TEST_PAUSE_AFTER_STEPS", "0"))
  put_batch, steps = sharding.put_batch, [0]

  def hooked_put_batch(*args, **kwargs):  # the loop calls this once per step
    if pause_after and steps[0] == pause_after:
      with open(os.path.join(_workdir(), "paused"), "w") as f:
        f.write(str(steps[0]))
      time.sleep(600)  # the test SIGKILLs us here
    steps[0] += 1
    time.sleep(delay)
    return put_batch(*args, **kwargs)

  sharding.put_batch = hooked_put_batch

  hold = os.environ.get("ITO_TEST_HOLD_SAVE_STEP")
  if hold:
    handler = grain.checkpoint.CheckpointHandler
    save = handler.save

    def held_save(self, directory, *args, **kwargs):
      # directory: CHECKPOINTS/<step>.orbax-checkpoint-tmp*/data
      step_dir = os.path.basename(os.path.dirname(str(directory)))
      if step_dir.split(".")[0] == hold:
        with open(os.path.join(_workdir(), "save_held"), "w") as f:
          f.write(step_dir)
        time.sleep(600)  # the test SIGKILLs us here
      return save(self, directory, *args, **kwargs)

    handler.save = held_save


if __name__ == "__main__":
  install_hooks()
  app.run(main.main)
