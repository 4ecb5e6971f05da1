"""benchmarks/attribute_purity.py: the class / colour / shape share of each
held-out image's nearest caption."""

import numpy as np
import pytest

from ito_jax.data import synthetic

import benchmark_scripts

attribute_purity = benchmark_scripts.load("attribute_purity")


def test_label_layout_matches_the_data_set():
  assert attribute_purity.NUM_SHAPES == len(synthetic.SHAPES)
  assert synthetic.CLASS_NAMES[2 * 5 + 3] == f"{synthetic.COLOURS[2]} {synthetic.SHAPES[3]}"


def test_scores_colour_and_shape_apart(tmp_path, capsys):
  labels = np.array([0, 1, 5, 7])  # red circle, red square, green circle, green triangle
  image = np.eye(4)
  # Image 0's nearest caption is caption 1 (same colour, other shape), image 1's
  # is caption 1 itself, image 2's caption 0 (same shape), image 3's caption 2
  # (same colour, other shape).
  text = np.zeros((4, 4))
  text[1, 0], text[1, 1], text[0, 2], text[2, 3] = 1.0, 2.0, 1.0, 1.0
  scores = attribute_purity.attribute_purity(image, text, labels)
  assert scores == pytest.approx({"class": 1 / 4, "colour": 3 / 4, "shape": 2 / 4})
  np.savez(tmp_path / "embeddings.npz", image=image, text=text, labels=labels)
  attribute_purity.main([str(tmp_path)])
  assert "class 0.250  colour 0.750  shape 0.500" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="embeddings.npz: missing"):
    attribute_purity.main([str(tmp_path / "nowhere")])
