"""notebooks/quickstart.ipynb: its install cell, and a run top to bottom on the CPU from this
clone (its tiny test mode)."""

import base64
import importlib.util
import json
import os
import subprocess

import nbclient
import nbformat
import pytest

from tests.quickstart.conftest import TINY

# The notebook's test mode: the tests' tiny setting, one path, one task, no teacher finetune
# (it shares compiled programs with test_quickstart through the compilation cache).
NOTEBOOK_TINY = {**TINY, "paths": ("miniend_d",), "tasks": ("pydoc_topic",),
                 "finetune_teacher": False}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
_FIND_SPEC = importlib.util.find_spec


def _source(nb):
  return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _install_cell(nb):
  (cell,) = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
  return cell.source


def test_notebook_is_made_for_colab():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  source = _source(nb)
  assert "ORG" not in json.dumps(nb), "no placeholder repository"
  install = _install_cell(nb)
  assert 'REPO = ""  # @param {type:"string"}' in install  # a Colab form field
  assert "google.colab" in source and "MINIEND_NOTEBOOK_SKIP_INSTALL" in source
  assert "jax.devices()" in source and '"tpu"' in source and '"gpu"' in source
  assert "quickstart.run(" in source and "display(Image(" in source
  assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code"), "commit it clean"


def _run_install_cell(monkeypatch, cwd, repo="", installed=False):
  """Executes the install cell in `cwd`; returns the pip commands it ran."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  commands = []
  monkeypatch.chdir(cwd)
  monkeypatch.delenv("MINIEND_NOTEBOOK_SKIP_INSTALL", raising=False)
  monkeypatch.setenv("MINIEND_REPO", repo)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      _FIND_SPEC(name, *a) if installed or name != "miniend_jax" else None))
  monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kw: commands.append(cmd[3:]))
  exec(compile(_install_cell(nb), "install", "exec"), {})  # pylint: disable=exec-used
  return commands


def test_install_cell_sources(tmp_path, monkeypatch, capsys):
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  # Nothing to install from: a clear message, not a pip error.
  with pytest.raises(RuntimeError, match="Set REPO in the form above"):
    _run_install_cell(monkeypatch, outside)
  url = "https://github.com/someone/miniend_jax.git"
  assert _run_install_cell(monkeypatch, outside, url) == [
      ["install", "-q", f"miniend_jax @ git+{url}"]]
  wheel = str(tmp_path / "miniend_jax-0.1.0-py3-none-any.whl")
  assert _run_install_cell(monkeypatch, outside, wheel) == [["install", "-q", wheel]]
  # Inside a clone (any folder of it), not installed yet: an editable install of the clone.
  clone = tmp_path / "clone"
  (clone / "notebooks").mkdir(parents=True)
  (clone / "pyproject.toml").write_text('[project]\nname = "miniend_jax"\n')
  assert _run_install_cell(monkeypatch, clone / "notebooks") == [
      ["install", "-q", "-e", str(clone.resolve())]]
  # Installed already: nothing to do.
  assert _run_install_cell(monkeypatch, outside, installed=True) == []
  assert "skipping pip install" in capsys.readouterr().out


def test_notebook_executes_on_cpu_from_this_clone(tmp_path, monkeypatch, compilation_cache_dir):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "nb_work"
  monkeypatch.delenv("MINIEND_NOTEBOOK_SKIP_INSTALL", raising=False)
  monkeypatch.delenv("MINIEND_REPO", raising=False)
  monkeypatch.setenv("MINIEND_NOTEBOOK_TEST", "1")
  monkeypatch.setenv("MINIEND_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compilation_cache_dir)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # The kernel starts in the clone's notebooks/ folder, as Jupyter opened from a clone does.
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "already installed" in text and "skipping pip install" in text
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
