"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 devices each) run
the same tide_shared distillation as one process with 8 devices and agree within 1e-5.

The multi-host run goes through the real entrypoint: ``python -m tide_jax.main`` with the
TIDE_COORDINATOR_ADDRESS / TIDE_NUM_PROCESSES / TIDE_PROCESS_ID variables, each host
reading its own share of the data; the global batch is assembled from both hosts' rows.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests import parallel_fixtures as pf
from tide_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def args(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  train, evals = pf.corpus_files(str(root / "corpus"))
  tok = pf.byte_tokenizer(str(root / "tok"))
  return dict(
      recipe="tide_shared",
      tokenizer=tok,
      teacher_tokenizer=tok,
      teacher_mask_id=257,
      teacher_checkpoint=pf.qwen_teacher(str(root / "teacher"), pf.STUDENT_VOCAB, seed=1),
      train_files=train,
      eval_files=evals,
      cache_dir=str(root / "cache"),
      mesh=MESH,
  )


def test_two_processes_agree_with_one(args, tmp_path):
  ref = loop.train_and_evaluate(pf.tiny_config(**args), str(tmp_path / "single"))
  args_file = tmp_path / "args.json"
  args_file.write_text(json.dumps(args))
  workdir = tmp_path / "two_hosts"
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
      JAX_PLATFORMS="cpu",
      JAX_NUM_CPU_DEVICES="4",
      TIDE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      TIDE_NUM_PROCESSES="2",
  )
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              "tide_jax.main",
              f"--config=tests/parallel_fixtures.py:{args_file}",
              f"--workdir={workdir}",
          ],
          cwd=REPO,
          env=dict(env, TIDE_PROCESS_ID=str(i)),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "over 8 devices, 2 process(es); global batch 8 (4 rows per host)" in outs[0][0]
  # Only process 0 prints progress (gloo's own connection lines aside) and writes files.
  assert "step 1/3" in outs[0][0] and "step 1/3" not in outs[1][0] and "mesh" not in outs[1][0]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for a, b in zip(ref["history"], train_rows):
    for key in ("loss", "ce_loss", "distill/loss", "grad_norm"):
      assert abs(a[key] - b[f"train/{key}"]) < 1e-5, (key, a[key], b[f"train/{key}"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["process_count"] == 2 and summary["mesh"] == {**MESH, "expert": 1}
  # The final held-out loss depends on every parameter after the three updates.
  assert abs(summary["eval"]["masked_nll"] - ref["eval"]["masked_nll"]) < 1e-5
