"""The replication study in miniature (replicate.quick): every stage runs, and every table
cell and figure of the report comes from those runs."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import replicate as replicate_config
from tide_jax.train import replicate, replicate_report

CONDITIONS = [
    "bd3lm",
    "kl_B",
    "reverse_kl_B",
    "tide_shared_B",
    "calm_A",
    "tide_shared_A",
    "tide_cross_A",
    "tide_shared_B_timestep_only",
    "tide_shared_B_training_only",
]


def last_eval(workdir, metric):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r[metric]) for r in rows if metric in r][-1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("replicate")
  config = replicate_config.get_config()
  config.replicate.quick = True
  config.replicate.doc = str(root / "docs" / "replication.md")
  config.replicate.figures_dir = str(root / "docs" / "replication")
  os.makedirs(root / "docs")
  with open(config.replicate.doc, "w") as f:
    f.write("# Replication\n\nHand-written reading that the runner must keep.\n")
  results = replicate.run(config, str(root / "work"))
  return root, results


def test_every_condition_ran_with_the_same_batches_and_steps(study):
  root, results = study
  work = root / "work"
  assert list(results["conditions"]) == CONDITIONS
  for condition in CONDITIONS:
    runs = results["conditions"][condition]["runs"]
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:
      summary = json.loads((work / run["workdir"] / "summary.json").read_text())
      assert summary["step"] == run["steps"] == 4
      # The reported numbers are the runs' last held-out evaluation, at the last step.
      assert last_eval(work / run["workdir"], "eval/bits_per_byte") == (4, run["bits_per_byte"])
      assert last_eval(work / run["workdir"], "eval/masked_nll") == (4, run["masked_nll"])
      assert run["cpu_s"] > 0 and run["wall_s"] > 0
  # Recipes differ: a distilled student is not the bd3lm run of its seed.
  for condition in CONDITIONS[1:]:
    a = results["conditions"][condition]["runs"][0]["bits_per_byte"]
    assert a != results["conditions"]["bd3lm"]["runs"][0]["bits_per_byte"], condition
  # Identical batches: the student rows of a pipeline-A run are those of its bd3lm run.
  first = [json.loads(line) for line in open(work / "test/bd3lm/seed0/metrics.jsonl")][1]
  other = [json.loads(line) for line in open(work / "test/calm_A/seed0/metrics.jsonl")][1]
  assert first["train/maskable_tokens"] == other["train/maskable_tokens"]
  assert first["train/masked_fraction"] == other["train/masked_fraction"]


def test_teachers_are_measured_by_their_own_bound(study):
  root, results = study
  for pipeline, tokenizer in (("B", "qwen3"), ("A", "llama3")):
    teacher = results["teachers"][pipeline]
    assert teacher["base_tokenizer"] == tokenizer
    assert 0.5 < teacher["bits_per_byte"] < 20
    assert os.path.exists(root / "work" / "teachers" / pipeline / "converted")
    curve = teacher["reliability"]
    assert len(curve["t"]) == len(curve["accuracy"]) == len(curve["nll"]) == 3


def test_every_table_cell_is_a_measured_number(study):
  root, results = study
  doc = open(root / "docs" / "replication.md").read()
  assert doc.startswith("# Replication\n\nHand-written reading that the runner must keep.")
  section = doc[doc.index("<!-- replicate:test:begin") :]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  assert len(rows) == 6 + len(CONDITIONS)  # recipes x pipelines, then every condition
  conditions = results["conditions"]
  for condition in CONDITIONS:
    # The per-condition table comes last (`bd3lm` also heads a row of the recipe matrix).
    row = [r for r in rows if r.startswith(f"| `{condition}` |")][-1]
    bpbs = [run["bits_per_byte"] for run in conditions[condition]["runs"]]
    mean, sd = np.mean(bpbs), np.std(bpbs, ddof=1)
    assert f"{mean:.3f} ± {sd:.3f}" in row
    nlls = [run["masked_nll"] for run in conditions[condition]["runs"]]
    assert f"{np.mean(nlls):.3f} ± {np.std(nlls, ddof=1):.3f}" in row
  # The recipe x pipeline matrix: each cell is its condition's mean ± sd over seeds.
  matrix = [r for r in rows if r.count("|") == 4]
  assert len(matrix) == 6  # bd3lm, kl, reverse_kl, tide_shared, calm, tide_cross
  filled = 0
  for r in matrix:
    recipe, *cells = [c.strip() for c in r.strip("|").split("|")]
    for pipeline, cell in zip(("B", "A"), cells):
      name = replicate.condition_name(recipe.strip("`"), pipeline)
      if cell == "—":
        assert name not in conditions, (r, name)
        continue
      bpbs = [run["bits_per_byte"] for run in conditions[name]["runs"]]
      assert cell == f"{np.mean(bpbs):.3f} ± {np.std(bpbs, ddof=1):.3f}", (r, name)
      filled += 1
  assert filled == 8  # 4 recipes per pipeline, the bd3lm baseline in both
  for pipeline in ("B", "A"):
    assert f"{results['teachers'][pipeline]['bits_per_byte']:.3f}" in section
  timing = results["timing"]
  assert timing["stages"] == 2 + 2 * len(CONDITIONS)
  assert timing["idle_wall_s"] > 0 and timing["stage_cpu_s"] > 0
  assert f"{timing['idle_wall_s'] / 60:.0f} min" in section


def test_figures_are_written_and_embedded(study):
  root, results = study
  doc = open(root / "docs" / "replication.md").read()
  for name in replicate_report.FIGURES:
    path = root / "docs" / "replication" / f"{name}.png"
    assert f"(replication/{name}.png)" in doc
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size[0] > 600
    assert os.path.getsize(results["figures"][name]) == os.path.getsize(path)


def test_a_second_run_resumes_without_training(study, capsys):
  root, results = study
  config = replicate_config.get_config()
  config.replicate.quick = True
  config.replicate.doc = ""
  again = replicate.run(config, str(root / "work"))
  out = capsys.readouterr().out
  assert "2 of 2 stages already finished" in out and "18 of 18 stages already finished" in out
  assert again["conditions"]["kl_B"] == results["conditions"]["kl_B"]
