"""Which ito_shapes attribute a trained run's embedding space gets right.

For each held-out image of a run (its `embeddings.npz`: image [E, D], text
[E, D], one caption per image, labels [E]), takes the nearest held-out caption
(its own included) and reports how often that caption's class, colour and
shape are the image's (label = colour * 5 + shape, ito_jax.data.synthetic).
Chance: class 1/30, colour 1/6, shape 1/5. R_ot can only find same-class
partners where the towers already tell classes apart; this says which part.

  python benchmarks/attribute_purity.py RUN_DIR [RUN_DIR ...]
"""

import os
import sys

import numpy as np

NUM_SHAPES = 5  # len(ito_jax.data.synthetic.SHAPES); kept here so this runs without the package


def attribute_purity(image: np.ndarray, text: np.ndarray, labels: np.ndarray) -> dict:
  nearest = labels[np.argmax(image @ text.T, axis=1)]
  return {"class": float(np.mean(nearest == labels)),
          "colour": float(np.mean(nearest // NUM_SHAPES == labels // NUM_SHAPES)),
          "shape": float(np.mean(nearest % NUM_SHAPES == labels % NUM_SHAPES))}


def main(run_dirs):
  if not run_dirs or any(a in ("-h", "--help") for a in run_dirs):
    sys.exit(__doc__)
  for run_dir in run_dirs:
    path = os.path.join(run_dir, "embeddings.npz")
    if not os.path.exists(path):
      sys.exit(f"{path}: missing (a finished training run writes it)")
    d = np.load(path)
    scores = attribute_purity(d["image"], d["text"], d["labels"])
    print(f"{run_dir}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
  main(sys.argv[1:])
