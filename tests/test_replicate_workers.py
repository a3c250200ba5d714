"""The study's worker processes end with their runner."""

import os
import subprocess
import sys
import time

SCRIPT = """
import multiprocessing, os, threading, time
from tide_jax.train import replicate

def worker(parent):
  threading.Thread(target=replicate.exit_with_parent, args=(parent, 0.1), daemon=True).start()
  time.sleep(120)

if __name__ == "__main__":
  child = multiprocessing.get_context("fork").Process(target=worker, args=(os.getpid(),))
  child.start()
  print(child.pid, flush=True)
  time.sleep(1.0)
  os._exit(0)  # the runner killed: nobody joins or terminates the worker
"""


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      state = [line for line in f if line.startswith("State:")][0]
  except FileNotFoundError:
    return False
  return " Z " not in state and "zombie" not in state


def test_a_worker_exits_when_its_runner_is_killed():
  runner = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
  pid = int(runner.stdout.readline())
  assert runner.wait(timeout=120) == 0
  deadline = time.time() + 30
  while _running(pid) and time.time() < deadline:
    time.sleep(0.2)
  assert not _running(pid), f"worker {pid} outlived its runner"
