"""MetricsWriter: metrics.jsonl and TensorBoard events, locally and on gs://."""

import struct

import numpy as np
import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from configs import common, tiny_cpu
from ito_jax import cli, train
from ito_jax.data import tokenizer as tokenizer_lib
from ito_jax.evaluate import embeddings
from ito_jax.metrics import MetricsWriter, read_jsonl
from tests.fake_gcs import fake_gcs  # noqa: F401  (fixture)

TRAIN = {"loss": np.float32(2.5), "learning_rate": 1e-3, "saturation/mean_margin": np.float32(-0.75)}
EVAL = {"zeroshot/accuracy": 0.25, "gap/centroid_distance": np.float64(0.5), "per_class": [0.1, 0.2]}


def read_events(tensorboard_dir) -> list[list[event_pb2.Event]]:
  """Every event file under the directory (oldest first), decoded from the
  TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc."""
  files = []
  for path in sorted(epath.Path(tensorboard_dir).glob("events.out.tfevents.*")):
    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
    files.append(events)
  return files


def scalars(events) -> dict:
  return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def write_run(workdir):
  with MetricsWriter(workdir) as writer:
    writer.write(10, TRAIN)
    writer.write(20, {**TRAIN, "loss": 2.0})
    writer.write(20, EVAL)


def check_run(workdir):
  assert read_jsonl(epath.Path(workdir) / "metrics.jsonl") == [
      {"step": 10, "learning_rate": 1e-3, "loss": 2.5, "saturation/mean_margin": -0.75},
      {"step": 20, "learning_rate": 1e-3, "loss": 2.0, "saturation/mean_margin": -0.75},
      {"step": 20, "gap/centroid_distance": 0.5, "per_class": [0.1, 0.2], "zeroshot/accuracy": 0.25},
  ]
  (events,) = read_events(epath.Path(workdir) / "tensorboard")
  assert scalars(events) == pytest.approx({  # lists are not scalars: per_class is not there
      ("learning_rate", 10): 1e-3, ("loss", 10): 2.5, ("saturation/mean_margin", 10): -0.75,
      ("learning_rate", 20): 1e-3, ("loss", 20): 2.0, ("saturation/mean_margin", 20): -0.75,
      ("gap/centroid_distance", 20): 0.5, ("zeroshot/accuracy", 20): 0.25,
  })


def test_jsonl_and_tensorboard_hold_the_same_scalars(tmp_path):
  write_run(tmp_path)
  check_run(tmp_path)


def test_truncate_after_drops_later_lines_and_purges_them_in_tensorboard(tmp_path):
  write_run(tmp_path)
  with MetricsWriter(tmp_path) as resumed:  # a run resumed from step 10
    resumed.truncate_after(10)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10]
    resumed.write(20, {"loss": 1.5})
  assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(10, 2.5), (20, 1.5)]
  first, second = read_events(tmp_path / "tensorboard")
  assert scalars(first)[("loss", 20)] == 2.0
  # TensorBoard hides events at steps >= 11 of earlier files on seeing this START.
  starts = [e.step for e in second if e.HasField("session_log")]
  assert starts == [11] and scalars(second) == {("loss", 20): 1.5}


def test_event_files_sort_in_opening_order_past_the_tenth(tmp_path, monkeypatch):
  """Event file names sort as text (here and in TensorBoard): with the
  process's counter unpadded, a writer's 10th file sorted before its 9th when
  both opened within one second, so the purge above applied backwards (seen
  in make test, where one worker opens many writers)."""
  import itertools

  from ito_jax import metrics
  monkeypatch.setattr(metrics, "_event_files", itertools.count(9))
  test_truncate_after_drops_later_lines_and_purges_them_in_tensorboard(tmp_path)


def test_a_half_written_last_line_is_dropped_on_resume_and_other_damage_is_named(tmp_path):
  """A run killed while appending leaves a torn last line; its resume must
  not die on it. A bad line anywhere else was not a torn write: refused."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10, "loss": 2.5}\n{"step": 20, "loss": 2.0}\n{"step": 30, "lo')
  with MetricsWriter(tmp_path, tensorboard=False) as resumed:
    resumed.truncate_after(20)
    resumed.write(30, {"loss": 1.5})
  assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(10, 2.5), (20, 2.0), (30, 1.5)]
  path.write_text('{"step": 10, "loss": 2.5}\nnot json\n{"step": 20, "loss": 2.0}\n')
  with pytest.raises(cli.BadArgument, match="metrics.jsonl: line 2 is not a JSON record"):
    MetricsWriter(tmp_path, tensorboard=False).truncate_after(20)


def test_other_processes_write_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr("jax.process_index", lambda: 1)
  write_run(tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_gs_workdir_metrics_tensorboard_and_embeddings(fake_gcs):
  """gs:// cannot append: the writer rewrites objects whole, and everything
  reads back through epath."""
  workdir = "gs://bucket/runs/a"
  write_run(workdir)
  check_run(workdir)
  with MetricsWriter(workdir) as resumed:
    resumed.truncate_after(10)
    resumed.write(30, {"loss": 1.0})
  assert [r["step"] for r in read_jsonl(f"{workdir}/metrics.jsonl")] == [10, 30]
  arrays = {"image": np.eye(3, 4, dtype=np.float32), "text": np.ones((3, 4), np.float32),
            "labels": np.arange(3, dtype=np.int32)}
  embeddings.save(f"{workdir}/embeddings.npz", arrays)
  loaded = embeddings.load(f"{workdir}/embeddings.npz")
  for key, value in arrays.items():
    np.testing.assert_array_equal(loaded[key], value)
    assert loaded[key].dtype == value.dtype
  assert "/bucket/runs/a/metrics.jsonl" in fake_gcs


def test_embeddings_sample_the_evaluation_without_embedding_again(tmp_path):
  """embeddings.npz is cut from the final evaluation's embeddings: the first
  eval.embeddings_limit captioned pairs (0: all), equal to embedding those
  images and their first captions directly."""
  from flax import nnx
  from ito_jax.data import tokenizer as tokenizer_lib
  from ito_jax.evaluate.evaluator import Evaluator, _embed_images, _embed_texts
  from ito_jax.models.ito import ItoModel
  config = tiny_cpu.get_config("runlocal")
  with nnx.use_eager_sharding(False):
    model = ItoModel(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  n, length = 7, config.model.text.context_length
  # Examples without a caption (eval_arrays' "captioned" False) have no pair: left out.
  data = {"images": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
          "tokens": rng.integers(3, 50, (n, 2, length)).astype(np.int32),
          "labels": np.arange(n, dtype=np.int32),
          "captioned": np.array([True, False, True, True, False, True, True])}
  tok = tokenizer_lib.train_tokenizer([f"a red circle number {i}" for i in range(30)],
                                      str(tmp_path / "tok.model"), 64)
  evaluator = Evaluator(config, data, [], tok)  # retrieval only: no class prompts
  evaluator.run(model)
  kept = [0, 2, 3, 5, 6]
  for limit, rows in ((0, kept), (3, kept[:3])):
    got = embeddings.held_out(evaluator.last_embeddings, data, evaluator.retrieval_rows, limit)
    np.testing.assert_array_equal(got["labels"], rows)
    np.testing.assert_allclose(got["image"], _embed_images(model, data["images"][rows]), atol=1e-6)
    np.testing.assert_allclose(got["text"], _embed_texts(model, data["tokens"][rows, 0]), atol=1e-6)


def test_a_set_shorter_than_the_eval_batch_is_embedded_unpadded():
  """5 examples with eval.batch_size 8 are one batch of 5, not 8 (tiny_cpu's
  runlocal padded 128 examples to 500); longer sets keep fixed batches, the
  last one padded and cut back."""
  from flax import nnx
  from ito_jax.evaluate.evaluator import embed_in_batches
  from ito_jax.models.ito import ItoModel
  with nnx.use_eager_sharding(False):
    model = ItoModel(tiny_cpu.get_config("runlocal").model, rngs=nnx.Rngs(0))
  seen = []

  def spy(model, rows):
    seen.append(rows.shape[0])
    return rows * 2

  rows = np.arange(13, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(embed_in_batches(spy, model, rows[:5], 8), rows[:5] * 2)
  assert seen == [5]
  seen.clear()
  np.testing.assert_array_equal(embed_in_batches(spy, model, rows, 6), rows * 2)
  assert seen == [6, 6, 6]


def test_eval_batches_are_dispatched_before_the_previous_one_is_read():
  """Batch k+1 is handed to the device before batch k's embeddings are read
  back (so the host prepares it while the device works), and no more than one
  batch waits unread. An empty array is refused by name."""
  from flax import nnx
  from ito_jax.evaluate.evaluator import embed_in_batches
  from ito_jax.models.ito import ItoModel
  with nnx.use_eager_sharding(False):
    model = ItoModel(tiny_cpu.get_config("runlocal").model, rngs=nnx.Rngs(0))
  events = []

  class Result:
    def __init__(self, k, rows):
      self.k, self.rows = k, rows

    def __array__(self, dtype=None, copy=None):
      events.append(f"read {self.k}")
      return np.asarray(self.rows) * 2

  def spy(model, rows):
    k = sum(e.startswith("embed") for e in events)
    events.append(f"embed {k}")
    return Result(k, rows)

  rows = np.arange(13, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(embed_in_batches(spy, model, rows, 4), rows * 2)
  assert events == ["embed 0", "embed 1", "read 0", "embed 2", "read 1", "embed 3", "read 2",
                    "read 3"]
  with pytest.raises(ValueError, match="no rows to embed"):
    embed_in_batches(spy, model, rows[:0], 4)


def test_embeddings_load_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="embeddings.npz does not exist"):
    embeddings.load(tmp_path / "embeddings.npz")
  np.savez(tmp_path / "partial.npz", image=np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"missing arrays \['text', 'labels'\]"):
    embeddings.load(tmp_path / "partial.npz")


def test_tokenizer_saves_and_loads_on_gs(fake_gcs):
  texts = [f"a {c} {s} on the left" for c in ("red", "green", "blue") for s in ("circle", "square")]
  trained = tokenizer_lib.train_tokenizer(texts * 5, "gs://bucket/run/tokenizer.model", vocab_size=64)
  loaded = tokenizer_lib.Tokenizer.load("gs://bucket/run/tokenizer.model")
  np.testing.assert_array_equal(loaded.encode_batch(texts, 8), trained.encode_batch(texts, 8))
  assert "/bucket/run/tokenizer.model" in fake_gcs


def test_remote_workdir_needs_a_local_data_dir():
  config = tiny_cpu.get_config("runlocal")
  with pytest.raises(common.ConfigError, match=r"config\.data\.data_dir: must name a local directory"):
    train.prepare_inputs(config, "gs://bucket/run")
