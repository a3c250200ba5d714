"""Stand-ins for gcloud, SLURM's commands and Python, for dry runs of the launchers.

Each stub appends one JSON line per call to ``$STUB_LOG`` (``{"tool", "argv", "cwd",
"env"}``) and imitates the real command far enough for the launchers to go on:

- ``gcloud``: TPU VM and queued-resource describe/create/delete (states in
  ``$STUB_DIR/state.json``), ``scp`` (into ``$STUB_DIR/worker_<i>/``), ``ssh`` (runs the
  command with bash in ``$STUB_DIR/worker_<i>`` as HOME, with ``TIDE_HOST_INDEX=i`` in place
  of the metadata server), ``storage ls`` (objects under ``$STUB_DIR/gcs``).
- ``srun``: one task per node (``$STUB_NODES``) with the environment SLURM gives a task;
  ``scancel --signal=TERM`` signals every process of the tasks; ``scontrol`` shows the job and records
  ``requeue``.
- ``python`` (as ``python3.11`` and every ``.venv/bin/python``): reports 3.11, makes venvs,
  records pip installs, copies files to ``gs://`` (etils.epath calls) into
  ``$STUB_DIR/gcs``, and plays a training run: prints steps for ``$STUB_TRAIN_SECONDS`` and,
  on SIGTERM, the line a preempted run prints, then exits 0 (a run that finishes writes
  summary.json into a gs:// workdir).
"""

from __future__ import annotations

import os
import stat
import sys

ENV_KEYS = (
    "TIDE_DISTRIBUTED",
    "TIDE_HOST_INDEX",
    "JAX_LOCAL_DEVICE_IDS",
    "JAX_PLATFORMS",
    "PROVISION_PYTHON",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_STEP_NODELIST",
    "SLURM_GPUS_ON_NODE",
)

COMMON = f"""
import json, os, shutil, signal, subprocess, sys, time

ENV_KEYS = {ENV_KEYS!r}


def record(tool, argv):
  line = json.dumps({{"tool": tool, "argv": argv, "cwd": os.getcwd(),
                     "env": {{k: os.environ[k] for k in ENV_KEYS if k in os.environ}}}})
  with open(os.environ["STUB_LOG"], "a") as f:
    f.write(line + "\\n")


def gcs_path(url):
  return os.path.join(os.environ["STUB_DIR"], "gcs", url[len("gs://"):])
"""

GCLOUD = """
STATE = os.path.join(os.environ["STUB_DIR"], "state.json")


def load():
  return json.load(open(STATE)) if os.path.exists(STATE) else {}


def save(state):
  json.dump(state, open(STATE, "w"))


def flag(args, name):
  for a in args:
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
  return None


def workers(which):
  count = int(os.environ.get("STUB_WORKERS", "1"))
  return range(count) if which == "all" else [int(which)]


def home(i):
  path = os.path.join(os.environ["STUB_DIR"], f"worker_{i}")
  os.makedirs(path, exist_ok=True)
  return path


args = sys.argv[1:]
record("gcloud", args)
kind = "queued" if "queued-resources" in args else "tpu"
state = load()
if os.environ.get("STUB_GCLOUD_ERROR") and "describe" in args:
  sys.exit(print(os.environ["STUB_GCLOUD_ERROR"], file=sys.stderr) or 1)
if "describe" in args:
  if kind not in state:
    print("ERROR: (gcloud) NOT_FOUND: Resource was not found", file=sys.stderr)
    sys.exit(1)
  value = state[kind]
  if isinstance(value, list):  # a sequence of states, one per describe
    state[kind] = value[1:] if len(value) > 1 else value[0]
    save(state)
    value = value[0]
  fmt = flag(args, "--format") or ""
  print(os.environ.get("STUB_WORKERS", "1") if "len()" in fmt else value)
elif "create" in args:
  if kind == "queued":
    state["queued"] = json.loads(os.environ.get("STUB_QUEUED_STATES", '["ACTIVE"]'))
  state["tpu"] = "READY"
  save(state)
elif "delete" in args:
  state.pop(kind, None)
  if kind == "queued":
    state.pop("tpu", None)
  save(state)
elif "scp" in args:
  src, dest = [a for a in args[args.index("scp") + 1:] if not a.startswith("--")][:2]
  for i in workers(flag(args, "--worker")):
    shutil.copy(src, os.path.join(home(i), dest.split(":", 1)[1]))
elif "ssh" in args:
  command = flag(args, "--command")
  if command.startswith("tail "):
    sys.exit(0)  # following a log never ends; the recorded call is what is checked
  rc = 0
  for i in workers(flag(args, "--worker")):
    env = dict(os.environ, HOME=home(i), TIDE_HOST_INDEX=str(i))
    done = subprocess.run(["bash", "-c", command], cwd=home(i), env=env)
    rc = rc or done.returncode
  sys.exit(rc)
elif args[:2] == ["storage", "ls"]:
  sys.exit(0 if os.path.exists(gcs_path(args[2])) else 1)
"""

PYTHON = """
args = sys.argv[1:]
record("python", args)
if args[:1] == ["-V"]:
  print("Python 3.11.9")
elif args[:1] == ["-c"]:
  if "epath" in args[1]:  # host_run.sh copying a log to gs://
    target = gcs_path(args[3])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(args[2], target + ".tmp")
    os.replace(target + ".tmp", target)  # an object store write is all or nothing
  # otherwise a version check: this interpreter is 3.11 with venv and ensurepip
elif args[:2] == ["-m", "venv"]:
  os.makedirs(os.path.join(args[2], "bin"), exist_ok=True)
  shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
elif args[:2] == ["-m", "tide_jax.main"]:
  stop = []
  signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
  workdir = [a for a in args if a.startswith("--workdir=")][0].split("=", 1)[1]
  print("step 1/100", flush=True)
  seconds = os.environ.get("STUB_TRAIN_SECONDS", "0")
  if os.environ.get("STUB_TRAIN_SECONDS_FILE"):
    seconds = open(os.environ["STUB_TRAIN_SECONDS_FILE"]).read()
  deadline = time.time() + float(seconds)
  while time.time() < deadline and not stop:
    time.sleep(0.05)
  if stop:
    print(f"Preempted: checkpoint of step 3 written to {workdir}; re-run the same "
          "command to resume.", flush=True)
  else:
    print("step 100/100", flush=True)
    if workdir.startswith("gs://"):  # a finished run writes summary.json
      os.makedirs(gcs_path(workdir), exist_ok=True)
      open(os.path.join(gcs_path(workdir), "summary.json"), "w").write("{}")
"""

SRUN = """
args = sys.argv[1:]
record("srun", args)
first = next(i for i, a in enumerate(args) if not a.startswith("--"))  # srun's own options
command = args[first:]
nodes = int(os.environ.get("STUB_NODES", "2"))
tasks = []
for i in range(nodes):
  env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURM_NTASKS=str(nodes),
             SLURM_STEP_NUM_TASKS=str(nodes), SLURM_STEP_TASKS_PER_NODE=f"1(x{nodes})",
             SLURM_STEP_NODELIST=f"gpu[001-00{nodes}]", SLURM_GPUS_ON_NODE="8")
  # Each task in its own process group: slurmstepd signals every process of a task.
  tasks.append(subprocess.Popen(command, env=env, start_new_session=True))
with open(os.path.join(os.environ["STUB_DIR"], "task_pids"), "w") as f:
  f.write(" ".join(str(t.pid) for t in tasks))
sys.exit(max(t.wait() for t in tasks))
"""

SCANCEL = """
args = sys.argv[1:]
record("scancel", args)
if "--signal=TERM" in args:
  for pid in open(os.path.join(os.environ["STUB_DIR"], "task_pids")).read().split():
    os.killpg(int(pid), signal.SIGTERM)
"""

SCONTROL = """
args = sys.argv[1:]
record("scontrol", args)
if args[:2] == ["show", "job"]:
  print(f"JobId={args[-1]} JobName=tide_jax UserId=me(1) Command={os.environ['STUB_COMMAND']} "
        f"WorkDir={os.environ.get('SLURM_SUBMIT_DIR', '')} StdOut=tide_{args[-1]}.log")
"""

UV = """
args = sys.argv[1:]
record("uv", args)
if args[:1] == ["venv"]:
  venv = args[-1]
  os.makedirs(os.path.join(venv, "bin"), exist_ok=True)
  shutil.copy(os.environ["STUB_PYTHON311"], os.path.join(venv, "bin", "python"))
"""

OLD_PYTHON = """
args = sys.argv[1:]
record("python3", args)
if args[:1] == ["-V"]:
  print("Python 3.10.12")
elif args[:1] == ["-c"]:
  sys.exit(1)  # not 3.11, and no ensurepip (python3-venv missing)
elif args[:4] == ["-m", "pip", "install", "--user"]:
  uv = os.path.join(os.environ["HOME"], ".local", "bin", "uv")
  os.makedirs(os.path.dirname(uv), exist_ok=True)
  shutil.copy(os.environ["STUB_UV"], uv)
"""


def write_stub(directory: str, name: str, body: str) -> str:
  """Writes an executable stub ``directory/name`` run by this Python."""
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\n{COMMON}\n{body}")
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
  return path
