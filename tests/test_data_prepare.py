"""Dataset preparation as an explicit step: a `gs://` cache_dir (the storage emulator) is
prepared through local staging and read from `gs://`; a multi-host training run never
prepares (each host would write the same dataset at once) and names the step instead.
"""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig

import ml_collections
import pytest

from tests.test_gcs_checkpoint import BUCKET, gcs  # noqa: F401 (the storage emulator fixture)
from tide_jax.data import prepare as data_prepare
from tide_jax.data.pipeline import make_iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB_FILES = ("json/encoder.py", "json/decoder.py", "json/scanner.py", "textwrap.py")

# Reads batches in a fresh process (the emulator's address reaches the GCS clients through
# the environment) and prints a hash of every row.
READER = """
import hashlib, json, sys
import ml_collections
from tide_jax.data import prepare as data_prepare
from tide_jax.data.pipeline import make_iterator
values, index, count, batches = json.loads(sys.argv[1])
it = make_iterator(ml_collections.ConfigDict(values), split="train", batch_size=2, seed=4,
                   process_index=index, process_count=count)
rows = [hashlib.sha1(r.tobytes()).hexdigest() for _ in range(batches) for r in next(it)["input_ids"]]
print("ROWS " + json.dumps([it.num_records, rows]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepare_corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in STDLIB_FILES:
    text = open(os.path.join(stdlib, name), encoding="utf-8").read()[:2500]
    (root / name.replace("/", "_")).write_text(text, encoding="utf-8")
  return root


def data_values(corpus, cache_dir) -> dict:
  return dict(
      format="text",
      train_files=[str(corpus / "*")],
      tokenizer="qwen3",
      max_len=64,
      block_size=16,
      cache_dir=str(cache_dir),
      eval_fraction=0.0,
  )


def write_config(path, values) -> str:
  path.write_text(
      "from ml_collections import config_dict\n\n\n"
      f"def get_config():\n  return config_dict.ConfigDict({values!r})\n"
  )
  return str(path)


def read_rows(env, values, index, count, batches=4):
  done = subprocess.run(
      [sys.executable, "-c", READER, json.dumps([values, index, count, batches])],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  line = [x for x in done.stdout.splitlines() if x.startswith("ROWS ")][0]
  return done.stdout, json.loads(line[len("ROWS ") :])


def test_a_gs_cache_dir_is_prepared_on_local_disk_uploaded_and_read_from_gs(
    gcs, corpus, tmp_path  # noqa: F811 (fixture argument)
):
  remote = f"gs://{BUCKET}/data_cache"
  values = data_values(corpus, remote)
  cmd = [
      sys.executable,
      "-m",
      "tide_jax.data.prepare",
      f"--config={write_config(tmp_path / 'data_config.py', values)}",
      f"--stage_dir={tmp_path / 'stage'}",
  ]
  first = subprocess.run(cmd, cwd=REPO, env=gcs["env"], capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  assert "preparing dataset in " + str(tmp_path / "stage") in first.stdout
  (folder,) = gcs["fs"].ls(f"{BUCKET}/data_cache/tide_sft")
  uploaded = sorted(os.path.basename(p) for p in gcs["fs"].ls(f"{folder}/1.0.0"))
  assert uploaded == [
      "dataset_info.json",
      "features.json",
      "metadata.json",
      "tide_sft-train_0.array_record-00000-of-00001",
  ]
  # The upload ends with the two files TFDS needs to see a dataset as prepared.
  order = [line.split()[1] for line in first.stdout.splitlines() if line.startswith("uploading ")]
  assert order[-2:] == ["features.json", "dataset_info.json"] and len(order) == 4

  # Read back from gs:// by the second of two hosts: the same rows as a local dataset gives.
  local = ml_collections.ConfigDict(data_values(corpus, tmp_path / "local"))
  make_iterator(local, split="train", batch_size=2, seed=4)  # one process prepares it
  reference = make_iterator(
      local, split="train", batch_size=2, seed=4, process_index=1, process_count=2
  )
  want = [
      hashlib.sha1(r.tobytes()).hexdigest() for _ in range(4) for r in next(reference)["input_ids"]
  ]
  out, (num_records, rows) = read_rows(gcs["env"], values, 1, 2)
  assert "preparing" not in out
  assert num_records == reference.num_records > 8
  assert rows == want

  # A second run of the step finds the dataset and neither prepares nor uploads.
  again = subprocess.run(cmd, cwd=REPO, env=gcs["env"], capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "preparing" not in again.stdout and "uploading" not in again.stdout


def test_a_multihost_run_refuses_to_prepare_and_the_step_prepares_once(corpus, tmp_path):
  cache = tmp_path / "cache"
  config = ml_collections.ConfigDict(data_values(corpus, cache))
  # Neither host of two prepares (the first one used to, while the others waited on it).
  for index in (0, 1):
    with pytest.raises(
        ValueError, match="the hosts of a multi-host run do not prepare it .* launch/prepare.sh"
    ):
      make_iterator(
          config, split="train", batch_size=2, seed=0, process_index=index, process_count=2
      )
  assert not cache.exists() or not any(cache.rglob("*.array_record*"))
  # The explicit step prepares it once; then every host reads the same dataset.
  summary = data_prepare.run(config, None)
  hosts = [
      make_iterator(config, split="train", batch_size=2, seed=0, process_index=p, process_count=2)
      for p in (0, 1)
  ]
  assert hosts[0].num_records == hosts[1].num_records == summary["train"]["examples"] > 8
  # With host-local caches each host prepares its own copy on first use; a shared gs://
  # cache_dir cannot be host-local.
  own = ml_collections.ConfigDict(
      dict(data_values(corpus, tmp_path / "host_1"), prepare_on="every_host")
  )
  mine = make_iterator(own, split="train", batch_size=2, seed=0, process_index=1, process_count=2)
  assert mine.num_records == hosts[1].num_records
  shared = ml_collections.ConfigDict(
      dict(data_values(corpus, f"gs://{BUCKET}/x"), prepare_on="every_host")
  )
  with pytest.raises(ValueError, match="is shared by the hosts; use a host-local cache_dir"):
    make_iterator(shared, split="train", batch_size=2, seed=0, process_index=1, process_count=2)


def test_the_step_without_a_cache_dir_asks_for_the_runs_workdir(corpus):
  config = ml_collections.ConfigDict(data_values(corpus, ""))
  with pytest.raises(ValueError, match="launch/prepare.sh CONFIG WORKDIR"):
    data_prepare.run(config, None)


GS_READER = """
import json, sys
from tide_jax.data import records
files = records.expand_files([sys.argv[1]])
items = list(records.read_records(files, "chat"))
print("READ " + json.dumps([files, [type(i).__name__ for i in items]]))
"""


def test_input_files_on_gs_are_matched_and_read(gcs):  # noqa: F811 (fixture argument)
  chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
  for name in ("a.jsonl", "b.jsonl", "notes.txt"):
    with gcs["fs"].open(f"{BUCKET}/inputs/{name}", "w") as f:
      f.write(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
  proc = subprocess.run(
      [sys.executable, "-c", GS_READER, f"gs://{BUCKET}/inputs/*.jsonl"],
      cwd=REPO,
      env=gcs["env"],
      capture_output=True,
      text=True,
      timeout=300,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("READ ")]
  assert proc.returncode == 0 and lines, proc.stderr[-2000:]
  files, kinds = json.loads(lines[-1][5:])
  assert files == [f"gs://{BUCKET}/inputs/a.jsonl", f"gs://{BUCKET}/inputs/b.jsonl"]
  assert kinds == ["ChatRecord"] * 4
