"""Checkpoints and metrics on gs:// (a local GCS emulator), killed and preempted runs.

The emulator (``gcp-storage-emulator``) is started on 127.0.0.1 with a free port and
stopped at the end. gcsfs (used by etils epath for metadata and metrics) follows
``STORAGE_EMULATOR_HOST``; tensorstore (array data) follows ``TENSORSTORE_GCS_HTTP_URL``;
the GCS client inside array_record's reader (prepared datasets) follows
``CLOUD_STORAGE_EMULATOR_ENDPOINT``.
Training runs are ``python -m tide_jax.main`` processes on 8 fake CPU devices.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from gcsfs.core import GCSFileSystem  # the plain client: no gRPC bucket-type probe

from tests import parallel_fixtures as pf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "tide-test"


# The emulator's media downloads carry no x-goog-generation header and ignore the
# ifGenerationMatch / ifGenerationNotMatch conditions that tensorstore's OCDBT manifest
# updates rely on (real GCS honours both); this launcher adds them before starting it.
EMULATOR = """
import sys
from http import HTTPStatus
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

plain_download = objects.download

def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return plain_download(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    not_match = request.query.get("ifGenerationNotMatch")
    if not_match and not_match[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return
    match = request.query.get("ifGenerationMatch")
    if match and match[0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    return plain_download(request, response, storage, *args, **kwargs)

objects.download = download
sys.argv[0] = "gcp-storage-emulator"
sys.exit(main())
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "log.txt", "w")
  proc = subprocess.Popen(
      [
          sys.executable,
          "-c",
          EMULATOR,
          "start",
          "--host=127.0.0.1",
          f"--port={port}",
          "--in-memory",
          f"--default-bucket={BUCKET}",
      ],
      stdout=log,
      stderr=log,
  )
  env = dict(
      os.environ,
      STORAGE_EMULATOR_HOST=url,
      TENSORSTORE_GCS_HTTP_URL=url,
      CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
      GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
  )
  fs = GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)
  deadline = time.time() + 30
  while True:
    try:
      fs.ls(BUCKET)
      break
    except Exception:
      if time.time() > deadline or proc.poll() is not None:
        raise
      time.sleep(0.2)
  yield {"env": env, "fs": fs}
  proc.terminate()
  proc.wait(timeout=10)
  log.close()


@pytest.fixture(scope="module")
def args_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("gcs_run")
  train, evals = pf.corpus_files(str(root / "corpus"))
  args = dict(
      recipe="bd3lm",
      tokenizer=pf.byte_tokenizer(str(root / "tok")),
      teacher_tokenizer=None,
      train_files=train,
      eval_files=evals,
      cache_dir=str(root / "cache"),
      mesh={"data": 8},
      num_steps=12,
  )
  path = root / "args.json"
  path.write_text(json.dumps(args))
  return str(path)


def command(args_file, workdir, *overrides):
  return [
      sys.executable,
      "-m",
      "tide_jax.main",
      f"--config=tests/parallel_fixtures.py:{args_file}",
      f"--workdir={workdir}",
      "--config.train.checkpoint_every=4",
      "--config.train.log_every=1",
      *overrides,
  ]


def run(gcs, args_file, workdir, *overrides):
  done = subprocess.run(
      command(args_file, workdir, *overrides),
      cwd=REPO,
      env=gcs["env"],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def start(gcs, args_file, workdir, *overrides):
  return subprocess.Popen(
      command(args_file, workdir, *overrides),
      cwd=REPO,
      env=gcs["env"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def wait_for_line(proc, prefix: str) -> str:
  for line in proc.stdout:
    if line.startswith(prefix):
      return line
  raise AssertionError(f"the run ended without printing {prefix!r}: {proc.stderr.read()[-3000:]}")


def metrics(gcs, run_name):
  text = gcs["fs"].cat(f"{BUCKET}/{run_name}/metrics.jsonl").decode()
  return [json.loads(line) for line in text.splitlines()]


def test_killed_run_resumes_to_the_uninterrupted_metrics(gcs, args_file):
  run(gcs, args_file, f"gs://{BUCKET}/full")
  fs = gcs["fs"]
  assert fs.exists(f"{BUCKET}/full/checkpoints/12/commit_success.txt")
  assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/full/checkpoints")) == ["12", "8"]
  assert fs.ls(f"{BUCKET}/full/tensorboard")
  full = metrics(gcs, "full")
  assert [r["step"] for r in full if "train/loss" in r] == list(range(1, 13))

  proc = start(gcs, args_file, f"gs://{BUCKET}/killed")
  wait_for_line(proc, "checkpoint of step 4 written")
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not fs.exists(f"{BUCKET}/killed/summary.json")  # it did not finish
  out = run(gcs, args_file, f"gs://{BUCKET}/killed")
  resumed_from = int(out.split("Resuming from checkpoint at step ")[1].split()[0])
  assert resumed_from in (4, 8)
  assert metrics(gcs, "killed") == full


def test_sigterm_writes_a_checkpoint_and_exits_zero(gcs, args_file):
  proc = start(
      gcs,
      args_file,
      f"gs://{BUCKET}/preempted",
      "--config.train.num_steps=5000",
      "--config.train.checkpoint_every=100000",
  )
  line = wait_for_line(proc, "step 2/5000")
  assert line
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  step = int(stdout.split("Preempted: checkpoint of step ")[1].split()[0])
  assert 2 <= step < 5000
  fs = gcs["fs"]
  assert fs.exists(f"{BUCKET}/preempted/checkpoints/{step}/commit_success.txt")
  rows = metrics(gcs, "preempted")
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, step + 1))


LOCK_SCENARIOS = """
import json, os, socket, subprocess, sys, time
from etils import epath
from tide_jax.train import workdir_lock

root = sys.argv[1]
notices, results = [], {}
say = notices.append

def attempt(workdir, stale_after_s=300.0):
  try:
    return workdir_lock.acquire(workdir, stale_after_s=stale_after_s, say=say, settle_s=0.5)
  except workdir_lock.WorkdirInUse as err:
    return str(err)

def foreign(workdir, age_s):
  owner = {"token": "foreign", "host": "another-host", "pid": 4242, "started": time.time() - 5000,
           "heartbeat": time.time() - age_s}
  (epath.Path(workdir) / "run.lock").write_text(json.dumps(owner))

foreign(f"{root}/fresh", age_s=10)
results["fresh_foreign"] = attempt(f"{root}/fresh")
foreign(f"{root}/stale", age_s=1000)
lock = attempt(f"{root}/stale")
results["stale_foreign_taken"] = not isinstance(lock, str)
results["notice"] = notices[-1] if notices else ""
lock.release()
results["released"] = not (epath.Path(f"{root}/stale") / "run.lock").exists()

holder = subprocess.Popen([sys.executable, "-c", sys.argv[2], f"{root}/held", "300"],
                          stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "held"
results["holder_pid"] = holder.pid
results["while_held"] = attempt(f"{root}/held")
time.sleep(1.0)
results["heartbeat_age"] = time.time() - json.loads(
    (epath.Path(f"{root}/held") / "run.lock").read_text())["heartbeat"]
holder.kill()
holder.wait()
lock = attempt(f"{root}/held")  # same host, dead pid: stale at once
results["after_kill_taken"] = not isinstance(lock, str)
lock.release()
print(json.dumps(results))
"""


def test_gcs_workdir_lock_refuses_live_owners_and_takes_over_stale_ones(gcs):
  from tests.test_resume_safety import HOLD_LOCK

  done = subprocess.run(
      [sys.executable, "-c", LOCK_SCENARIOS, f"gs://{BUCKET}/locks", HOLD_LOCK],
      cwd=REPO,
      env=gcs["env"],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  assert results["fresh_foreign"].startswith(
      f"Workdir gs://{BUCKET}/locks/fresh is in use by another run (host another-host, pid 4242"
  )
  assert re.search(r"last seen 1\d s ago", results["fresh_foreign"]), results["fresh_foreign"]
  assert results["stale_foreign_taken"] and "host another-host" in results["notice"]
  assert results["released"]
  assert f"pid {results['holder_pid']}" in results["while_held"]
  assert results["heartbeat_age"] < 5.0
  assert results["after_kill_taken"]
