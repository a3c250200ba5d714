"""Dry runs of the launchers with stand-ins for gcloud, srun/scancel/scontrol and Python on
PATH (tests/launch_stubs.py): the exact commands issued, what reaches the workers and the
training processes, per-host logs, preemption handling and the SLURM requeue.

The scripts run from a copy of launch/ in a fresh git repository under tmp_path, so nothing
here touches this checkout's .venv.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

from tests import launch_stubs
from tide_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
    "setup.sh",
    "prepare.sh",
    "tpu_vm.sh",
    "gpu_slurm.sh",
    "host_run.sh",
    "host_stop.sh",
    "plan_flags.sh",
)
# A list override with a space and quotes inside: it must reach tide_jax.main as one argument.
LIST_OVERRIDE = "--config.data.train_files=['gs://b/a b.parquet','gs://b/c.parquet']"


def make_repo(root) -> str:
  """A git checkout with the launch scripts, a tracked and an untracked config, ignored files."""
  repo = os.path.join(root, "repo")
  os.makedirs(os.path.join(repo, "launch"))
  for name in SCRIPTS:
    shutil.copy(os.path.join(REPO, "launch", name), os.path.join(repo, "launch", name))
  shutil.copy(os.path.join(REPO, "requirements.txt"), repo)
  os.makedirs(os.path.join(repo, "configs"))
  open(os.path.join(repo, "configs", "tracked.py"), "w").write("# tracked\n")
  open(os.path.join(repo, ".gitignore"), "w").write(".venv/\nruns/\n")
  git_env = dict(
      os.environ,
      GIT_AUTHOR_NAME="t",
      GIT_AUTHOR_EMAIL="t@t",
      GIT_COMMITTER_NAME="t",
      GIT_COMMITTER_EMAIL="t@t",
  )
  for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
    subprocess.run(["git", *cmd], cwd=repo, check=True, env=git_env)
  open(os.path.join(repo, "configs", "untracked.py"), "w").write("# new, not committed\n")
  os.makedirs(os.path.join(repo, "runs"))
  open(os.path.join(repo, "runs", "ignored.txt"), "w").write("ignored\n")
  return repo


@pytest.fixture()
def stubs(tmp_path):
  """PATH with the stubs first; returns the environment and helpers to read the calls."""
  stub_dir = tmp_path / "stub"
  bin_dir = tmp_path / "bin"
  os.makedirs(stub_dir)
  os.makedirs(bin_dir)
  python311 = launch_stubs.write_stub(str(bin_dir), "python3.11", launch_stubs.PYTHON)
  for name, body in (
      ("gcloud", launch_stubs.GCLOUD),
      ("srun", launch_stubs.SRUN),
      ("scancel", launch_stubs.SCANCEL),
      ("scontrol", launch_stubs.SCONTROL),
  ):
    launch_stubs.write_stub(str(bin_dir), name, body)
  env = dict(
      os.environ,
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      STUB_DIR=str(stub_dir),
      STUB_LOG=str(stub_dir / "calls.jsonl"),
      STUB_PYTHON311=python311,
      TPU_NAME="tide-a",
      ZONE="us-west4-a",
      POLL_SECONDS="0",
  )
  for name in ("PYTHON", "TIDE_HOST_INDEX", "SLURM_JOB_ID", "SLURM_PROCID", "JAX_PLATFORMS"):
    env.pop(name, None)

  def calls(tool=None):
    path = stub_dir / "calls.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [c for c in map(json.loads, lines) if tool in (None, c["tool"])]

  return {"env": env, "dir": stub_dir, "calls": calls}


def run(cmd, env, cwd, timeout=120, check=True):
  done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
  if check:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done


def wait_for(predicate, timeout=60.0):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, "timed out"
    time.sleep(0.1)


def gcloud_verbs(stubs):
  """The gcloud calls without their --zone flag: ["compute tpus tpu-vm describe tide-a ..."]."""
  return [
      " ".join(a for a in c["argv"] if a != "--zone=us-west4-a") for c in stubs["calls"]("gcloud")
  ]


def pip_installs(stubs, cwd_suffix):
  return [
      c["argv"][3:]
      for c in stubs["calls"]("python")
      if c["argv"][:3] == ["-m", "pip", "install"] and c["cwd"].endswith(cwd_suffix)
  ]


# ------------------------------------------------------------------------------ setup.sh


def test_setup_requires_python_311_and_provisions_one_with_uv(tmp_path, stubs):
  repo = make_repo(tmp_path)
  # A TPU VM image: python3 is 3.10 without python3-venv, no python3.11, no uv.
  tools = tmp_path / "tools"
  os.makedirs(tools)
  for tool in ("bash", "dirname", "grep", "cut", "sha256sum", "cat", "rm", "env"):
    os.symlink(shutil.which(tool), tools / tool)
  launch_stubs.write_stub(str(tools), "python3", launch_stubs.OLD_PYTHON)
  env = dict(
      stubs["env"],
      PATH=str(tools),
      HOME=str(tmp_path / "home"),
      STUB_UV=launch_stubs.write_stub(str(tmp_path), "uv_stub", launch_stubs.UV),
  )
  failed = run(["bash", "launch/setup.sh", "tpu"], env, repo, check=False)
  assert failed.returncode == 2
  assert failed.stderr.strip().splitlines() == [
      "error: launch/setup.sh needs Python 3.11 with its venv module (jax 0.10.2 requires "
      ">=3.11, numpy 2.4.6 has no 3.10 wheels) but found Python 3.10.12; install python3.11 "
      "and python3.11-venv, or rerun with PROVISION_PYTHON=1 to download one with uv."
  ]
  assert not os.path.exists(os.path.join(repo, ".venv"))

  run(["bash", "launch/setup.sh", "tpu"], dict(env, PROVISION_PYTHON="1"), repo)
  assert [c["argv"] for c in stubs["calls"]("python3") if "pip" in c["argv"]] == [
      ["-m", "pip", "install", "--user", "--quiet", "uv==0.13.8"]
  ]
  assert [c["argv"] for c in stubs["calls"]("uv")] == [
      ["python", "install", "3.11"],
      ["venv", "--seed", "--python", "3.11", ".venv"],
  ]
  torch = [
      line for line in open(os.path.join(repo, "requirements.txt")) if line.startswith("torch==")
  ]
  assert pip_installs(stubs, "repo") == [
      ["--quiet", "--upgrade", "pip"],
      ["--quiet", torch[0].strip(), "--index-url", "https://download.pytorch.org/whl/cpu"],
      ["--quiet", "-r", "requirements.txt"],
      [
          "--quiet",
          "jax[tpu]==0.10.2",
          "-f",
          "https://storage.googleapis.com/jax-releases/libtpu_releases.html",
      ],
  ]
  again = run(["bash", "launch/setup.sh", "tpu"], dict(env, PROVISION_PYTHON="1"), repo)
  assert "[setup] .venv is up to date (tpu)" in again.stdout
  assert len(pip_installs(stubs, "repo")) == 4
  # A machine with python3.11 (tests, CI): no uv, torch and the rest from PyPI, no JAX extra.
  cpu_repo = make_repo(tmp_path / "cpu")
  run(["bash", "launch/setup.sh"], stubs["env"], cpu_repo)
  assert pip_installs(stubs, "cpu/repo") == [
      ["--quiet", "--upgrade", "pip"],
      ["--quiet", "-r", "requirements.txt"],
  ]
  assert [c["argv"] for c in stubs["calls"]("python") if c["cwd"] == cpu_repo][:2] == [
      ["-c", "import sys, ensurepip, venv; sys.exit(sys.version_info[:2] != (3, 11))"],
      ["-V"],
  ]


# ------------------------------------------------------------------------------ tpu_vm.sh


def worker_file(stubs, worker, path):
  return stubs["dir"] / f"worker_{worker}" / "tide_jax" / path


def test_tpu_train_creates_ships_provisions_and_starts_every_worker(tmp_path, stubs):
  repo = make_repo(tmp_path)
  env = dict(stubs["env"], STUB_WORKERS="2", SPOT="1", DETACH="1")
  cmd = ["launch/tpu_vm.sh", "train", "configs/untracked.py", "gs://bkt/runs/a", LIST_OVERRIDE]
  out = run(cmd, env, repo).stdout
  verbs = gcloud_verbs(stubs)
  assert verbs[:3] == [
      "compute tpus tpu-vm describe tide-a --format=value(state)",
      "alpha compute tpus tpu-vm create tide-a --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --autocheckpoint-enabled --spot",
      "compute tpus tpu-vm describe tide-a --format=value(state)",
  ]
  assert verbs[3] == "compute tpus tpu-vm describe tide-a --format=value(networkEndpoints.len())"
  assert verbs[4].startswith("compute tpus tpu-vm scp ") and verbs[4].endswith(
      " tide-a:tide_jax.tar.gz --worker=all"
  )
  # The working tree minus ignored files: the untracked config travels, runs/ does not.
  with tarfile.open(stubs["dir"] / "worker_1" / "tide_jax.tar.gz") as archive:
    shipped = set(archive.getnames())
  assert {"configs/tracked.py", "configs/untracked.py", "launch/tpu_vm.sh"} <= shipped
  assert not any(name.startswith(("runs", ".git/", ".venv")) for name in shipped)
  # Every worker provisioned Python 3.11 and installed the TPU build.
  for worker in (0, 1):
    assert ["--quiet", "jax[tpu]==0.10.2", "-f", launch_stubs_libtpu()] in pip_installs(
        stubs, f"worker_{worker}/tide_jax"
    )
  setup = [c for c in stubs["calls"]("gcloud") if "ssh" in c["argv"]][0]
  assert "PROVISION_PYTHON=1 bash launch/setup.sh tpu" in " ".join(setup["argv"])
  # The training command on both workers, the list override intact, one JAX runtime.
  for worker in (0, 1):
    wait_for(lambda: worker_file(stubs, worker, "run/state").exists())
    wait_for(lambda: worker_file(stubs, worker, "run/state").read_text().strip() == "finished")
  trains = [c for c in stubs["calls"]("python") if c["argv"][:2] == ["-m", "tide_jax.main"]]
  assert sorted(c["env"]["TIDE_HOST_INDEX"] for c in trains) == ["0", "1"]
  for c in trains:
    assert c["argv"][2:] == [
        "--config=configs/untracked.py",
        "--workdir=gs://bkt/runs/a",
        LIST_OVERRIDE,
    ]
    assert c["env"]["TIDE_DISTRIBUTED"] == "auto"
  # Each host's log, on the worker and in the gs:// workdir.
  for worker in (0, 1):
    remote = stubs["dir"] / f"gcs/bkt/runs/a/logs/host_{worker}.log"
    wait_for(lambda: remote.exists() and remote.read_text().rstrip().endswith("finished"))
    log = remote.read_text()
    assert "step 100/100" in log and log.rstrip().endswith(f"host {worker}: finished")
    assert worker_file(stubs, worker, f"logs/host_{worker}.log").read_text() == log
  assert "gs://bkt/runs/a/logs/host_<i>.log" in out


def worker_log(stubs, worker) -> str:
  """A worker's local log so far ("" before it exists)."""
  path = worker_file(stubs, worker, f"logs/host_{worker}.log")
  return path.read_text() if path.exists() else ""


def launch_stubs_libtpu():
  return "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def test_tpu_preempted_slice_is_deleted_and_recreated_and_describe_errors_stop(tmp_path, stubs):
  repo = make_repo(tmp_path)
  (stubs["dir"] / "state.json").write_text(json.dumps({"tpu": "PREEMPTED"}))
  env = dict(stubs["env"], DETACH="1", SKIP_SHIP="1", AUTOCHECKPOINT="0")
  done = run(["launch/tpu_vm.sh", "train", "configs/tracked.py", "gs://bkt/r"], env, repo)
  verbs = gcloud_verbs(stubs)
  assert verbs[:3] == [
      "compute tpus tpu-vm describe tide-a --format=value(state)",
      "compute tpus tpu-vm delete tide-a --quiet",
      "compute tpus tpu-vm describe tide-a --format=value(state)",
  ]
  assert verbs[3] == (
      "compute tpus tpu-vm create tide-a --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite"
  )
  assert "tide-a is PREEMPTED; it cannot be restarted" in done.stdout
  # A describe that fails for another reason stops the launcher; nothing is created.
  before = len(stubs["calls"]("gcloud"))
  failed = run(
      ["launch/tpu_vm.sh", "train", "configs/tracked.py", "gs://bkt/r"],
      dict(env, STUB_GCLOUD_ERROR="ERROR: (gcloud) PERMISSION_DENIED: no access"),
      repo,
      check=False,
  )
  assert failed.returncode == 2
  assert failed.stderr.strip() == (
      "error: gcloud could not describe tide-a in us-west4-a: "
      "ERROR: (gcloud) PERMISSION_DENIED: no access"
  )
  assert len(stubs["calls"]("gcloud")) == before + 1


def test_tpu_queued_resource_for_v5p_waits_until_active(tmp_path, stubs):
  repo = make_repo(tmp_path)
  env = dict(
      stubs["env"],
      QUEUED="1",
      SPOT="1",
      ACCELERATOR_TYPE="v5p-8",
      DETACH="1",
      SKIP_SHIP="1",
      STUB_QUEUED_STATES='["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]',
  )
  done = run(["launch/tpu_vm.sh", "train", "configs/tracked.py", "gs://bkt/r"], env, repo)
  verbs = gcloud_verbs(stubs)
  assert verbs[:2] == [
      "compute tpus queued-resources describe tide-a --format=value(state.state)",
      "compute tpus queued-resources create tide-a --node-id=tide-a --accelerator-type=v5p-8 "
      "--runtime-version=v2-alpha-tpuv5 --spot",
  ]
  assert verbs[2:6] == [
      "compute tpus queued-resources describe tide-a --format=value(state.state)"
  ] * 3 + ["compute tpus tpu-vm describe tide-a --format=value(state)"]
  assert "tide-a is WAITING_FOR_RESOURCES; waiting" in done.stdout
  # A suspended queued resource (Spot preemption) is deleted with its slice and requested anew.
  (stubs["dir"] / "state.json").write_text(json.dumps({"queued": "SUSPENDED", "tpu": "PREEMPTED"}))
  run(["launch/tpu_vm.sh", "train", "configs/tracked.py", "gs://bkt/r"], env, repo)
  verbs = gcloud_verbs(stubs)[len(verbs) :]
  assert verbs[1] == "compute tpus queued-resources delete tide-a --force --quiet"
  assert verbs[3].startswith("compute tpus queued-resources create tide-a --node-id=tide-a")


def test_tpu_prepare_converts_and_prepares_data_once_on_worker_0(tmp_path, stubs):
  repo = make_repo(tmp_path)
  env = dict(stubs["env"], STUB_WORKERS="4")
  run(["launch/tpu_vm.sh", "prepare", "configs/tracked.py", "gs://bkt/r", LIST_OVERRIDE], env, repo)
  converts = [c for c in stubs["calls"]("python") if c["argv"][:2] == ["-m", "tide_jax.convert"]]
  assert len(converts) == 1
  assert converts[0]["cwd"].endswith("worker_0/tide_jax")
  assert converts[0]["argv"][2:] == ["--config=configs/tracked.py", LIST_OVERRIDE]
  assert converts[0]["env"]["JAX_PLATFORMS"] == "cpu"
  # The dataset goes where training looks for it: the same workdir and overrides.
  data = [c for c in stubs["calls"]("python") if c["argv"][:2] == ["-m", "tide_jax.data.prepare"]]
  assert len(data) == 1 and data[0]["cwd"].endswith("worker_0/tide_jax")
  assert data[0]["argv"][2:] == [
      "--config=configs/tracked.py",
      "--workdir=gs://bkt/r",
      LIST_OVERRIDE,
  ]
  assert data[0]["env"]["JAX_PLATFORMS"] == "cpu"
  ssh = [c["argv"] for c in stubs["calls"]("gcloud") if "ssh" in c["argv"]]
  assert "--worker=0" in ssh[-1] and "--worker=all" in ssh[-2]
  assert not [c for c in stubs["calls"]("python") if c["argv"][:2] == ["-m", "tide_jax.main"]]


def test_tpu_status_logs_and_stop_free_the_tpu(tmp_path, stubs):
  repo = make_repo(tmp_path)
  fake_accel = tmp_path / "accel0"
  fake_accel.write_text("")
  env = dict(
      stubs["env"],
      STUB_WORKERS="2",
      DETACH="1",
      STUB_TRAIN_SECONDS="120",
      TPU_DEVICES=f"^{tmp_path}/accel[0-9]+$",
      LIBTPU_LOCK=str(tmp_path / "libtpu_lockfile"),
  )
  run(["launch/tpu_vm.sh", "train", "configs/tracked.py", "gs://bkt/r"], env, repo)
  for worker in (0, 1):
    wait_for(lambda: "step 1/100" in worker_log(stubs, worker))
  status = run(["launch/tpu_vm.sh", "status"], env, repo).stdout
  assert "[tpu_vm] tide-a: READY" in status
  assert "worker 0: running" in status and "worker 1: running" in status
  # A second start on a busy slice is refused instead of starting a second process.
  busy = run(
      ["launch/tpu_vm.sh", "train", "configs/tracked.py", "gs://bkt/r"],
      dict(env, SKIP_SHIP="1"),
      repo,
      check=False,
  )
  assert busy.returncode != 0 and "a run is already in progress here; stop it first" in busy.stderr
  run(["launch/tpu_vm.sh", "logs", "1"], env, repo)
  assert gcloud_verbs(stubs)[-1] == (
      "compute tpus tpu-vm ssh tide-a --worker=1 --command=tail -n 200 -F ~/tide_jax/logs/host_1.log"
  )
  # An orphan holding the (fake) TPU device, as a killed run's child would.
  (tmp_path / "libtpu_lockfile").write_text("")
  orphan = subprocess.Popen(["sleep", "300"], stdin=open(fake_accel))
  try:
    stopped = run(["launch/tpu_vm.sh", "stop"], env, repo).stdout
    assert orphan.wait(timeout=10) == -signal.SIGKILL
  finally:
    if orphan.poll() is None:
      orphan.kill()
  assert f"freeing the TPU: killing {orphan.pid}" in stopped
  assert not (tmp_path / "libtpu_lockfile").exists()
  for worker in (0, 1):
    assert worker_file(stubs, worker, "run/state").read_text().strip() == "preempted"
  # A run marked running whose process is gone (the VM restarted under it) shows as lost.
  worker_file(stubs, 1, "run/state").write_text("running\n")
  worker_file(stubs, 1, "run/pid").write_text(f"{orphan.pid}\n")  # reaped: no such process
  status = run(["launch/tpu_vm.sh", "status"], env, repo).stdout
  assert "worker 0: preempted" in status and "worker 1: lost" in status
  for worker in (0, 1):
    log = (stubs["dir"] / f"gcs/bkt/r/logs/host_{worker}.log").read_text()
    assert "Preempted: checkpoint of step 3 written to gs://bkt/r" in log


def test_tpu_watch_recreates_a_preempted_slice_and_resumes_until_finished(tmp_path, stubs):
  repo = make_repo(tmp_path)
  seconds = tmp_path / "train_seconds"
  seconds.write_text("300")
  env = dict(
      stubs["env"],
      STUB_WORKERS="2",
      SPOT="1",
      WATCH_INTERVAL="1",
      STUB_TRAIN_SECONDS_FILE=str(seconds),
  )
  watch = subprocess.Popen(
      ["launch/tpu_vm.sh", "watch", "configs/tracked.py", "gs://bkt/w"],
      cwd=repo,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    for worker in (0, 1):
      wait_for(lambda: "step 1/100" in worker_log(stubs, worker))
    seconds.write_text("0")  # the run after the restart finishes at once
    state = json.loads((stubs["dir"] / "state.json").read_text())
    (stubs["dir"] / "state.json").write_text(json.dumps(dict(state, tpu="PREEMPTED")))
    out, _ = watch.communicate(timeout=120)
  finally:
    if watch.poll() is None:
      watch.kill()
  assert watch.returncode == 0, out
  verbs = gcloud_verbs(stubs)
  creates = [v for v in verbs if " create " in v]
  assert len(creates) == 2 and creates[0] == creates[1]
  deleted = verbs.index("compute tpus tpu-vm delete tide-a --quiet")
  assert verbs.index(creates[0]) < deleted < len(verbs) - verbs[::-1].index(creates[1]) - 1
  trains = [c for c in stubs["calls"]("python") if c["argv"][:2] == ["-m", "tide_jax.main"]]
  assert len(trains) == 4  # both workers, before and after the preemption
  assert "tide-a is PREEMPTED; it cannot be restarted" in out
  assert "[tpu_vm] the run finished: gs://bkt/w/summary.json" in out


# ------------------------------------------------------------------------------ gpu_slurm.sh


def slurm_job(tmp_path, stubs, *, gpu_venv=True, train_seconds="0", config="b.py"):
  """Runs gpu_slurm.sh the way slurmd does: a copy in a spool directory, submitted from
  another directory; returns (process, repo, workdir)."""
  repo = make_repo(tmp_path)
  os.makedirs(os.path.join(repo, ".venv", "bin"))
  shutil.copy(stubs["env"]["STUB_PYTHON311"], os.path.join(repo, ".venv", "bin", "python"))
  if gpu_venv:
    digest = subprocess.run(
        ["sha256sum", "requirements.txt"], cwd=repo, capture_output=True, text=True
    ).stdout.split()[0]
    open(os.path.join(repo, ".venv", ".requirements.sha256"), "w").write(f"{digest} gpu\n")
  spool = tmp_path / "spool"
  os.makedirs(spool)
  shutil.copy(os.path.join(repo, "launch", "gpu_slurm.sh"), spool / "slurm_script")
  submit = tmp_path / "home"
  os.makedirs(submit / "my_configs")
  (submit / "my_configs" / config).write_text("# the user's own config\n")
  workdir = str(tmp_path / "shared" / "run")
  env = dict(
      stubs["env"],
      SLURM_JOB_ID="77",
      SLURM_SUBMIT_DIR=str(submit),
      SLURM_GPUS_ON_NODE="8",
      STUB_COMMAND=os.path.join(repo, "launch", "gpu_slurm.sh"),
      STUB_TRAIN_SECONDS=train_seconds,
  )
  proc = subprocess.Popen(
      ["bash", str(spool / "slurm_script"), f"my_configs/{config}", workdir, LIST_OVERRIDE],
      cwd=spool,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  return proc, repo, workdir


def test_slurm_time_limit_checkpoints_and_requeues(tmp_path, stubs):
  header = open(os.path.join(REPO, "launch", "gpu_slurm.sh")).read()
  assert "#SBATCH --signal=B:USR1@300\n" in header and "#SBATCH --requeue\n" in header
  proc, repo, workdir = slurm_job(tmp_path, stubs, train_seconds="120")
  for host in (0, 1):
    log = os.path.join(workdir, "logs", f"host_{host}.log")
    wait_for(lambda: os.path.exists(log) and "step 1/100" in open(log).read())
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers to the batch shell
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, out + err
  assert [c["argv"] for c in stubs["calls"]("scancel")] == [["--signal=TERM", "77"]]
  assert [c["argv"] for c in stubs["calls"]("scontrol")] == [
      ["show", "job", "-o", "77"],
      ["requeue", "77"],
  ]
  for host in (0, 1):
    log = open(os.path.join(workdir, "logs", f"host_{host}.log")).read()
    assert f"Preempted: checkpoint of step 3 written to {workdir}" in log
    assert log.rstrip().endswith(f"host {host}: preempted")
  # The teacher and the data were prepared once, on the batch host, before the training step.
  steps = ("tide_jax.convert", "tide_jax.data.prepare", "srun", "tide_jax.main")
  order = [c["tool"] if c["tool"] != "python" else c["argv"][1] for c in stubs["calls"]()]
  order = [t for t in order if t in steps]
  assert order == ["tide_jax.convert", "tide_jax.data.prepare", "srun"] + ["tide_jax.main"] * 2
  config = str(tmp_path / "home" / "my_configs" / "b.py")  # found in the submission directory
  (data,) = [c for c in stubs["calls"]("python") if c["argv"][1:2] == ["tide_jax.data.prepare"]]
  assert data["argv"][2:] == [f"--config={config}", f"--workdir={workdir}", LIST_OVERRIDE]
  (srun,) = stubs["calls"]("srun")
  assert srun["cwd"] == repo
  assert srun["argv"] == [
      "--ntasks-per-node=1",
      "--kill-on-bad-exit=1",
      "bash",
      "launch/host_run.sh",
      workdir,
      ".venv/bin/python",
      "-m",
      "tide_jax.main",
      f"--config={config}",
      f"--workdir={workdir}",
      LIST_OVERRIDE,
  ]
  # Each task's environment gives its process all 8 GPUs of its node.
  for task in [c for c in stubs["calls"]("python") if c["argv"][1:2] == ["tide_jax.main"]]:
    assert task["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert distributed.local_device_ids(task["env"]) == list(range(8))
    no_override = {k: v for k, v in task["env"].items() if k != "JAX_LOCAL_DEVICE_IDS"}
    assert distributed.local_device_ids(no_override) == list(range(8))


def test_slurm_job_that_ends_is_not_requeued_and_an_unprepared_venv_is_refused(tmp_path, stubs):
  proc, repo, workdir = slurm_job(tmp_path / "a", stubs)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, out + err
  assert [c["argv"] for c in stubs["calls"]("scontrol")] == [["show", "job", "-o", "77"]]
  assert not stubs["calls"]("scancel")
  assert (
      open(os.path.join(workdir, "logs", "host_1.log")).read().rstrip().endswith("host 1: finished")
  )
  proc, repo, _ = slurm_job(tmp_path / "b", stubs, gpu_venv=False)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 2
  assert err.strip() == (
      f"error: {repo}/.venv is not set up for GPUs with the current requirements.txt; run "
      f"'bash launch/setup.sh gpu' in {repo} on a machine with network access (a login "
      "node), then submit again."
  )
  assert len(stubs["calls"]("srun")) == 1  # only the first job's


PLAN = {  # docs/benchmarks/memory_plan.md: (config, target) -> mesh and micro-batches
    ("configs/pipeline_a.py", "v5litepod-16"): "expert=8 fsdp=-1 microbatches=1",
    ("configs/pipeline_a.py:calm", "v5p-8"): "expert=4 fsdp=-1 microbatches=1",
    ("pipeline_a.py", "gpu8"): "expert=8 fsdp=-1 microbatches=1",
    ("configs/pipeline_b.py", "v5litepod-16"): "fsdp=-1 microbatches=1",
    ("configs/pipeline_b.py:kl", "v5p-8"): "fsdp=-1 microbatches=1",
    ("/abs/pipeline_b.py", "gpu8"): "fsdp=-1 microbatches=1",
    ("configs/smoke.py", "gpu8"): "",
    ("configs/pipeline_a.py", "v4-32"): "",
}


@pytest.mark.parametrize("config,target", list(PLAN))
def test_plan_flags_give_the_memory_plans_mesh_and_microbatches(config, target):
  out = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "plan_flags.sh"), config, target],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.split()
  short = " ".join(flag.split(".")[-1] for flag in out)
  assert short == PLAN[(config, target)]
  assert all(re.fullmatch(r"--config\.(mesh|train)\.\w+=-?\d+", flag) for flag in out)


def test_slurm_puts_the_plan_before_the_users_overrides(tmp_path, stubs):
  proc, _, workdir = slurm_job(tmp_path, stubs, config="pipeline_a.py")
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, out + err
  assert "memory-plan defaults for 8 GPUs per node" in out
  (srun,) = stubs["calls"]("srun")
  assert srun["argv"][-4:] == [
      "--config.mesh.expert=8",
      "--config.mesh.fsdp=-1",
      "--config.train.microbatches=1",
      LIST_OVERRIDE,
  ]
  (data,) = [c for c in stubs["calls"]("python") if c["argv"][1:2] == ["tide_jax.data.prepare"]]
  assert data["argv"][-4:] == srun["argv"][-4:]


def test_tpu_puts_the_plan_before_the_users_overrides(tmp_path, stubs):
  repo = make_repo(tmp_path)
  open(os.path.join(repo, "configs", "pipeline_a.py"), "w").write("# the user's copy\n")
  env = dict(stubs["env"], STUB_WORKERS="1", DETACH="1", ACCELERATOR_TYPE="v5p-8")
  cmd = ["launch/tpu_vm.sh", "train", "configs/pipeline_a.py", "gs://bkt/runs/a", LIST_OVERRIDE]
  done = run(cmd, env, repo)
  assert "memory-plan defaults for v5p-8: --config.mesh.expert=4" in done.stdout + done.stderr
  wait_for(lambda: worker_file(stubs, 0, "run/state").exists())
  wait_for(lambda: worker_file(stubs, 0, "run/state").read_text().strip() == "finished")
  (train,) = [c for c in stubs["calls"]("python") if c["argv"][:2] == ["-m", "tide_jax.main"]]
  assert train["argv"][2:] == [
      "--config=configs/pipeline_a.py",
      "--workdir=gs://bkt/runs/a",
      "--config.mesh.expert=4",
      "--config.mesh.fsdp=-1",
      "--config.train.microbatches=1",
      LIST_OVERRIDE,
  ]
