"""Every path a user gives as gs:// works: a bucket on this machine (`tests.fake_gcs`).

The first test runs the real command line (`cli.main`, as the `miniend` script
calls it) three times on the bucket: `miniend convert` of a Hugging Face teacher
that lives there, `miniend distill` with its work dir, teacher (the converted one),
vocabulary (the Hugging Face one), data and compilation cache there, then
`miniend export --out_dir gs://...`. The test then reads the bucket's objects
itself: nothing may land in a local "gs:" directory. The others read teachers of
the other layouts, and write a sweep's and the GLUE report's tables there. All run
in this process, the bucket's variables set for each test only.
"""

import json
import os

import jax
import numpy as np
import pytest
import transformers

from miniend_jax import cli
from miniend_jax.cli import report, sweep
from miniend_jax.model import hf
from miniend_jax.quickstart import pipeline as quickstart_pipeline
from miniend_jax.train import checkpoints
from tests.fake_gcs import FakeGcs
from tests.model import checkpoint_testing, hf_testing
from tests.train import loop_testing

BUCKET = "miniend-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  store = FakeGcs(BUCKET, tmp_path_factory.mktemp("fake_gcs"))
  yield store
  store.close()


def test_convert_distill_export_on_a_bucket(tmp_path, tmp_path_factory, gcs, capfd,
                                            monkeypatch):
  data_dir = loop_testing.shared_data_dir(tmp_path_factory)
  gcs.upload_tree(tmp_path_factory.getbasetemp() / "pydoc_data", "data")
  teacher = tmp_path / "teacher"
  hf_testing.make_hf_model(family="v1_1", vocab_size=3200).save_pretrained(teacher)
  (teacher / "spiece.model").write_bytes(
      open(os.path.join(data_dir, "pydoc", "vocab_3000", "spiece.model"), "rb").read())
  gcs.upload_tree(teacher, "teacher_hf")

  gs = f"gs://{BUCKET}"
  train_flags = [f"--gin.TrainConfig.{k}={v}"
                 for k, v in dict(loop_testing.TINY_TRAIN, eval_batches=1).items()]
  commands = [
      ["convert", "--teacher", f"{gs}/teacher_hf", "--out_dir", f"{gs}/teacher"],
      ["distill", "--workdir", f"{gs}/run", "--teacher", f"{gs}/teacher",
       "--vocabulary", f"{gs}/teacher_hf", "--data_dir", f"{gs}/data",
       "--student_shape", "1L-32H", "--recipe", "kd_logits", "--num_steps", "2", "--no_progress",
       f"--gin.TrainConfig.compilation_cache_dir='{gs}/jax_cache'",
       "--gin.CheckpointConfig.save_interval_steps=2", *train_flags],
      ["export", "--workdir", f"{gs}/run", "--out_dir", f"{gs}/export"],
  ]
  # In this process, from tmp_path (a gs:// path written as a local one would land in
  # ./gs:), on the bucket's variables; JAX's compilation cache, which the distill
  # moves to the bucket, is put back for the tests after this one.
  for name, value in gcs.env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.chdir(tmp_path)
  session_cache = jax.config.jax_compilation_cache_dir
  capfd.readouterr()
  codes = []
  try:
    for argv in commands:  # each as from a shell, until one fails
      codes.append(cli.main(argv))
      if codes[-1]:
        break
  finally:
    jax.config.update("jax_compilation_cache_dir", session_cache)
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.reset_cache()
  out = capfd.readouterr()
  # On a failure: the lines that name an error, and the bucket's last requests.
  errors = [line for line in (out.out + out.err).splitlines()
            if "Error" in line or "miniend" in line]
  last_requests = [line for line, _ in gcs.requests[-10:]]
  assert codes == [0, 0, 0], "\n".join([f"exit codes {codes}:"] + errors[-30:] + [
      "The bucket's last requests:"] + last_requests)
  assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local directory"

  names = set(gcs.names())
  assert {"teacher/0/_CHECKPOINT_METADATA", "teacher/spiece.model", "run/summary.json",
          "run/distill_config.gin", "run/logs/train_metrics.jsonl", "export/config.json",
          "export/model.safetensors", "export/spiece.model"} <= names, sorted(names)
  assert any(n.startswith("run/checkpoints/2/") for n in names), sorted(names)
  assert any(n.startswith("jax_cache/") and not n.endswith("/") for n in names), sorted(names)
  assert not any(".tmp" in n for n in names), sorted(names)

  # The export reloads with transformers and holds the checkpoint's weights.
  export = gcs.download_tree("export", tmp_path / "export")
  run = gcs.download_tree("run", tmp_path / "run")
  assert json.loads((run / "summary.json").read_text())["step"] == 2
  assert type(transformers.AutoModelForSeq2SeqLM.from_pretrained(export)).__name__ == (
      "T5ForConditionalGeneration")
  transformers.AutoTokenizer.from_pretrained(export)
  ckpt = str(run / "checkpoints")
  config, exported = hf.load_hf(str(export))
  assert config == checkpoints.load_model_config(ckpt).replace(dtype=config.dtype,
                                                               param_dtype=config.param_dtype)
  saved = checkpoints.load_params_from_checkpoint(ckpt)
  flat_saved = dict(_flatten(saved))
  for name, value in _flatten(exported):
    np.testing.assert_array_equal(value, flat_saved[name], err_msg=name)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield prefix + key, np.asarray(value)


def test_sweep_and_report_tables_of_runs_on_a_bucket(tmp_path, gcs, monkeypatch):
  # A sweep's and a GLUE report's directories as the runs leave them, on the bucket;
  # the tables are collected from there and written back there (in this process).
  for name, value in gcs.env.items():
    monkeypatch.setenv(name, value)
  local = tmp_path / "sweep"
  runs = {"recipe=kd_logits": 4.0, "recipe=miniend_d": 3.5}
  local.mkdir()
  (local / sweep.MANIFEST).write_text(json.dumps(
      {"mode": "distill", "grid": {"train.recipe": ["'kd_logits'", "'miniend_d'"]},
       "evaluate_tasks": ["glue_rte"],
       "runs": [{"name": n, "bindings": {"train.recipe": repr(n.split("=")[1])}}
                for n in runs]}))
  for name, loss in runs.items():
    (local / name / "logs").mkdir(parents=True)
    (local / name / "eval").mkdir()
    (local / name / "summary.json").write_text(json.dumps(
        {"step": 2, "train": {"loss": loss}, "eval": {"eval/loss": loss + 0.5}}))
    (local / name / "logs" / "train_metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "grad_norm/encoder": loss * s}) + "\n" for s in (1, 2)))
    (local / name / "eval" / "glue_rte.json").write_text(
        json.dumps({"glue_rte": {"accuracy": 20 * loss}}))
  gcs.upload_tree(local, "sweep")

  root = f"gs://{BUCKET}/sweep"
  rows = sweep.collect(root)
  assert [(r["run"], r["state"], r["eval_loss"], r["grad_norm_encoder_max"],
           r["glue_rte/accuracy"]) for r in rows] == [
               ("recipe=kd_logits", "done", 4.5, 8.0, 80.0),
               ("recipe=miniend_d", "done", 4.0, 7.0, 70.0)]
  files = sweep.write_table(root, rows)
  assert set(files.values()) == {f"{root}/sweep_results.md", f"{root}/sweep_results.csv",
                                 f"{root}/sweep.png"}
  written = gcs.download_tree("sweep", tmp_path / "back")
  assert "| recipe=miniend_d |" in (written / "sweep_results.md").read_text()
  assert (written / "sweep_results.csv").read_text().splitlines()[0].startswith("run,")
  assert (written / "sweep.png").read_bytes().startswith(b"\x89PNG")

  # The GLUE report reads ROOT/<model>/**/eval/glue_*.json and writes its CSV there too.
  assert report.main([root, "--csv", f"{root}/glue.csv"]) == 0
  assert "glue.csv" in " ".join(gcs.names("sweep/"))
  assert [r["RTE"] for r in report.collect(root)] == [80.0, 70.0]
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")


def test_sharded_and_t5x_teachers_read_from_a_bucket(tmp_path, gcs, monkeypatch):
  # A sharded safetensors checkpoint (its index names the files) and a T5X one
  # (tensorstore's gcs driver) read from the bucket equal the local read. The
  # command-line test above reads a single safetensors file; PyTorch .bin and Flax
  # msgpack files are read whole with epath's read_bytes.
  for name, value in gcs.env.items():
    monkeypatch.setenv(name, value)
  model = hf_testing.make_hf_model(family="v1_1")
  model.save_pretrained(tmp_path / "safetensors", max_shard_size="100KB")
  checkpoint_testing.write_t5x(model, tmp_path / "t5x", chunk_elements=1 << 16)
  _, expected = hf.load_hf(str(tmp_path / "safetensors"))
  for fmt in ("safetensors", "t5x"):
    gcs.upload_tree(tmp_path / fmt, f"formats/{fmt}")
    _, params = hf.load_hf(f"gs://{BUCKET}/formats/{fmt}")
    flat = dict(_flatten(params))
    for name, value in _flatten(expected):
      np.testing.assert_array_equal(flat[name], value, err_msg=f"{fmt}: {name}")


def test_quickstart_refuses_a_bucket_work_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="give a local directory"):
    quickstart_pipeline.run(f"gs://{BUCKET}/quickstart")
  assert not (tmp_path / "gs:").exists()
