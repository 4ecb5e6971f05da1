"""The serving CLI's checks that need no export: embed's caption file, and a
load test against a server that is not (or no longer) listening."""

import socket
import threading
import time

import pytest

from ito_jax.serve import loadtest
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


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_loadtest_against_a_dead_port_stops_at_once():
  """--url with nothing listening fails in well under a second saying so,
  instead of counting refused requests for the whole --seconds."""
  start = time.monotonic()
  with pytest.raises(SystemExit, match=r"loadtest: cannot connect to http://127.0.0.1:\d+ .*is the "
                                       r"server running\?"):
    main(["loadtest", f"--url=http://127.0.0.1:{_closed_port()}", "--seconds=20"])
  assert time.monotonic() - start < 5


def test_loadtest_ends_when_the_server_stops_listening():
  """A server that goes away mid-run ends every client early; the report's
  first error says why."""
  listener = socket.create_server(("127.0.0.1", 0))
  port = listener.getsockname()[1]

  def accept_once_then_close():
    conn, _ = listener.accept()  # the load test's reachability check
    conn.close()
    listener.close()

  threading.Thread(target=accept_once_then_close, daemon=True).start()
  start = time.monotonic()
  report = loadtest.run(f"http://127.0.0.1:{port}", clients=2, seconds=20, kind="text")
  assert time.monotonic() - start < 10
  assert report.errors >= 1 and "stopped listening; the load test ends here" in report.first_error


@pytest.mark.parametrize("args, message", [
    (["http", "--export=x", "--port=99999"], "argument --port: 99999 is out of range: expected 0 to 65535"),
    (["http", "--export=x", "--max_batch=0"], "argument --max_batch: 0 is out of range: expected at least 1"),
    (["embed", "--export=x", "--out=o.npy", "--max_batch=two"], "argument --max_batch: 'two' is not an integer"),
    (["loadtest", "--url=http://127.0.0.1:1", "--clients=0"], "argument --clients: 0 is out of range"),
])
def test_a_flag_out_of_range_is_a_usage_error(args, message, capsys):
  """Not a traceback from deep in socketserver (an OverflowError for the port)
  or the embedder: argparse's usage line and the flag, before anything loads."""
  with pytest.raises(SystemExit) as e:
    main(args)
  assert e.value.code == 2
  assert message in capsys.readouterr().err
