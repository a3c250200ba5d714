"""The Colab notebook, executed headless (nbclient) with its parameter cell switched to a tiny
run and no installs; and the Colab install step's choice of packages."""

from __future__ import annotations

import importlib.util
import os

import nbformat
from nbclient import NotebookClient

from tests.test_train_e2e import REPO
from tide_jax import plot

NOTEBOOK = os.path.join(REPO, "notebooks", "colab_smoke.ipynb")

TINY = """
INSTALL = False
REPO_URL = ""
WORKDIR = {workdir!r}
TEACHER_STEPS = 2
STUDENT_STEPS = 4
EVAL_EVERY = 2
LOG_EVERY = 2
MAX_LEN = 64
BATCH_SIZE = 2
TEACHER_LAYERS = 1
TRAIN_FILES = ["pystdlib://json/*.py"]
SAMPLE_PROMPTS = ["def f(x):\\n"]
RELIABILITY_RATIOS = 3
MAX_NEW_TOKENS = 32
"""


def outputs(nb, kind):
  return [
      o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
  ]


def text_output(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_runs_end_to_end_on_a_tiny_config(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  default_names = {
      line.split("=")[0].strip() for line in params[0].source.splitlines() if "=" in line
  }
  tiny_names = {line.split("=")[0].strip() for line in TINY.splitlines() if "=" in line}
  assert default_names == tiny_names  # the test sets every parameter the notebook has
  workdir = str(tmp_path / "colab_smoke")
  params[0].source = TINY.format(workdir=workdir)
  # The kernel sees one CPU device, like a Colab runtime (not the tests' 8 fake devices).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # Started in notebooks/, as when the file is opened there; it finds the checkout's root.
  resources = {"metadata": {"path": os.path.join(REPO, "notebooks")}}
  NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()

  # Every figure: the seven run curves (the BD3LM student logs no distillation term, the
  # TIDE-Shared one does) and the teacher-reliability curve, shown inline and on disk.
  figures = [spec.name for spec in plot.FIGURES] + ["teacher_reliability"]
  for name in figures:
    assert os.path.getsize(os.path.join(workdir, "plots", f"{name}.png")) > 10_000, name
  assert len(outputs(nb, "image/png")) == len(figures)
  assert "skipped" not in text_output(nb)
  # The three stages ran, and the export holds the model, tokenizer and sampler settings.
  for stage in ("teacher", "student_tide_shared", "student_bd3lm"):
    assert os.path.exists(os.path.join(workdir, stage, "summary.json"))
  exported = set(os.listdir(os.path.join(workdir, "student_hf")))
  assert {"config.json", "model.safetensors", "bd3lm.json", "tokenizer.json"} <= exported
  assert "the export generates the same tokens" in text_output(nb)
  assert "Held-out bits per byte and masked-token loss" in text_output(nb)


def load_colab_setup():
  spec = importlib.util.spec_from_file_location(
      "colab_setup", os.path.join(REPO, "launch", "colab_setup.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_colab_install_keeps_the_runtime_packages():
  setup = load_colab_setup()
  with open(os.path.join(REPO, "requirements.txt")) as f:
    text = f.read()
  preinstalled = {"numpy": "2.0.2", "torch": "2.8.0+cpu", "matplotlib": "3.10.0"}
  install, constraints = setup.notebook_requirements(text, preinstalled)
  names = [r.split("==")[0] for r in install]
  assert constraints == ["numpy==2.0.2", "torch==2.8.0+cpu", "matplotlib==3.10.0"]
  for kept in ("numpy", "torch", "matplotlib", "pytest", "lm-eval", "nbclient"):
    assert kept not in names
  pins = dict(line.split("==") for line in text.splitlines() if "==" in line and "#" not in line)
  for needed in ("jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "pillow"):
    assert f"{needed}=={pins[needed]}" in install
  # Without a preinstalled matplotlib or pillow, the pinned ones are installed.
  install, constraints = setup.notebook_requirements(text, {"numpy": "2.0.2"})
  assert constraints == ["numpy==2.0.2"]
  assert f"matplotlib=={pins['matplotlib']}" in install and "torch" not in str(install)
