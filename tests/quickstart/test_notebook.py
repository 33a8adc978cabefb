"""notebooks/quickstart.ipynb runs top to bottom on the CPU (its tiny test mode)."""

import base64
import json
import os

import nbclient
import nbformat

from tests.quickstart.conftest import TINY

# The notebook's test mode: the tests' tiny setting, one path, one task, no teacher finetune
# (it shares compiled programs with test_quickstart through the compilation cache).
NOTEBOOK_TINY = {**TINY, "paths": ("miniend_d",), "tasks": ("pydoc_topic",),
                 "finetune_teacher": False}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _source(nb):
  return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_notebook_is_made_for_colab():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  source = _source(nb)
  assert "!pip install" in source and "git+{REPO_URL}" in source
  assert "google.colab" in source and "MINIEND_NOTEBOOK_SKIP_INSTALL" in source
  assert "jax.devices()" in source and '"tpu"' in source and '"gpu"' in source
  assert "quickstart.run(" in source and "display(Image(" in source
  assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code"), "commit it clean"


def test_notebook_executes_on_cpu(tmp_path, monkeypatch, compilation_cache_dir):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "nb_work"
  monkeypatch.setenv("MINIEND_NOTEBOOK_TEST", "1")
  monkeypatch.setenv("MINIEND_NOTEBOOK_SKIP_INSTALL", "1")
  monkeypatch.setenv("MINIEND_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compilation_cache_dir)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "skipping pip install" in text
  assert "CPU device(s)" in text
  pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pngs) == 3
  for png in pngs:
    assert base64.b64decode(png.data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
  tables = [o.data["text/markdown"] for o in outputs
            if o.output_type == "display_data" and "text/markdown" in o.data]
  assert len(tables) == 1 and "| teacher (t5-v1_1-tiny) |" in tables[0]
  assert "| miniend_d (1L-32H) |" in tables[0]
  results = json.load(open(workdir / "results.json"))
  assert [r["model"] for r in results["rows"]] == ["teacher", "miniend_d"]
  assert 0 <= results["rows"][1]["pydoc_topic/accuracy"] <= 100
  for key, value in NOTEBOOK_TINY.items():
    assert results["settings"][key] == (list(value) if isinstance(value, tuple) else value), key
  for name in ("loss_curves", "grad_norms", "scores"):
    assert (workdir / f"{name}.png").stat().st_size > 10_000
