"""The serving CLI's input checks, which run before any export is loaded."""

import pytest

from ito_jax.serve.__main__ import main


@pytest.mark.parametrize("content,message", [
    ("a red circle\n\ntwo blue squares\n", r"texts.txt, line 2 is blank"),
    ("a red circle\n   \n", r"texts.txt, line 2 is blank"),
    ("a red circle\ntwo blue squares\n\n", r"texts.txt, line 3 is blank"),
    ("", r"texts.txt is empty"),
])
def test_embed_refuses_a_blank_caption_line(tmp_path, content, message):
  """Row i of the output is line i of --texts: a blank line is refused, naming
  its number, instead of being dropped (which shifted every later row)."""
  (tmp_path / "texts.txt").write_text(content)
  with pytest.raises(SystemExit, match=message):
    main(["embed", f"--export={tmp_path / 'no_export'}", f"--texts={tmp_path / 'texts.txt'}",
          f"--out={tmp_path / 'out.npy'}"])
  assert not (tmp_path / "out.npy").exists()
