"""One training run per workdir: ``<workdir>/run.lock`` names the owner, a second run is refused.

The lock file holds JSON: a random token, the host name, the process id, the process's start
time and the run's start time, plus a heartbeat time. How ownership is decided:

* Local workdirs: the owner holds an exclusive ``flock`` on the file for the whole run, so a
  run that died (killed, crashed, machine rebooted) releases it at once; the JSON only
  serves to name the owner in the refusal.
* Object stores (``gs://``), which have no locks: the file is the lock. A heartbeat thread
  rewrites it every ``stale_after_s / 5`` seconds. It is stale, and taken over with a
  notice, when its heartbeat is older than ``stale_after_s``, or at once when it names a
  process on this host that no longer runs. A new run writes its own file, waits, and
  reads it back: of two runs started within that moment, the one whose token is not in the
  file refuses. The heartbeat also checks the token and reports a run that lost its lock.

A lock left by an earlier call in the same process (a notebook call that raised) is this
process's own and is reclaimed. In a multi-host run only process 0 takes the lock and every
process learns its answer, so that all of them stop together.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"

# Locks held by this process, by path: a new acquire of the same path replaces the old one.
_HELD: dict[str, "WorkdirLock"] = {}


class WorkdirInUse(ValueError):
  """Another run holds the workdir; the message is one sentence naming it."""


def _process_start_ticks(pid: int) -> int | None:
  """The start time of ``pid`` in clock ticks since boot (tells a reused pid apart)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  return int(stat[stat.rfind(")") + 2 :].split()[19])


def _pid_runs(pid: int, start_ticks: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  now_ticks = _process_start_ticks(pid)
  return start_ticks is None or now_ticks is None or now_ticks == start_ticks


def _describe(owner: dict[str, Any]) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
  text = f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {started}"
  if "heartbeat" in owner:
    text += f", last seen {max(0.0, time.time() - float(owner['heartbeat'])):.0f} s ago"
  return text


class WorkdirLock:
  """The lock of one workdir (see the module docstring); release it when the run ends."""

  def __init__(self, workdir: str, *, stale_after_s: float, say: Callable[[str], None]):
    self.workdir = workdir
    self.path = epath.Path(workdir) / LOCK_FILE
    self.local = "://" not in workdir
    self.stale_after_s = float(stale_after_s)
    self.say = say
    self.token = secrets.token_hex(8)
    self.owner = {
        "token": self.token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start_ticks(os.getpid()),
        "started": time.time(),
    }
    self.fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  # ------------------------------------------------------------------ shared

  def _read(self) -> dict[str, Any] | None:
    try:
      owner = json.loads(self.path.read_text())
    except (OSError, ValueError):  # absent, being written, or garbage: no owner to respect
      return None
    return owner if isinstance(owner, dict) and "token" in owner else None

  def _owner_text(self) -> str:
    if self.local:  # the flock says whether the owner runs; no heartbeat needed
      return json.dumps(self.owner)
    return json.dumps({**self.owner, "heartbeat": time.time()})

  def _refuse(self, owner: dict[str, Any] | None) -> WorkdirInUse:
    who = f" ({_describe(owner)})" if owner else ""
    stale = "" if self.local else f" or wait {self.stale_after_s:.0f} s after it stopped"
    return WorkdirInUse(
        f"Workdir {self.workdir} is in use by another run{who}; wait for it to finish{stale}, "
        f"or use another --workdir (if that run is surely dead, delete {self.path})."
    )

  # ------------------------------------------------------------------ local

  def _acquire_local(self) -> None:
    import fcntl  # POSIX only; imported here so that the module imports everywhere

    self.path.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._refuse(self._read()) from None
        raise
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same_file = False
      if same_file:  # not a file its previous owner unlinked while we opened it
        break
      os.close(fd)
    previous = self._read()
    if previous is not None:
      self.say(
          f"The previous run on {self.workdir} ({_describe(previous)}) ended without "
          "releasing its lock; taking it over."
      )
    os.ftruncate(fd, 0)
    os.write(fd, self._owner_text().encode())
    self.fd = fd

  def _release_local(self) -> None:
    import fcntl

    try:
      os.unlink(self.path)  # unlinked while locked: a waiting opener sees a new inode
    except OSError:
      pass
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)
    self.fd = None

  # ------------------------------------------------------------------ object stores

  def _stale(self, owner: dict[str, Any]) -> bool:
    if owner.get("host") == socket.gethostname() and not _pid_runs(
        int(owner.get("pid", -1)), owner.get("process_start")
    ):
      return True
    return time.time() - float(owner.get("heartbeat", 0)) > self.stale_after_s

  def _acquire_remote(self, settle_s: float) -> None:
    owner = self._read()
    if owner is not None and owner["token"] != self.token:
      if not self._stale(owner):
        raise self._refuse(owner)
      self.say(
          f"Taking over the lock of {self.workdir} from a run that stopped without "
          f"releasing it ({_describe(owner)})."
      )
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(self._owner_text())
    time.sleep(settle_s)  # a run that wrote at the same moment has written by now
    owner = self._read()
    if owner is None or owner["token"] != self.token:
      raise self._refuse(owner)
    self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._heartbeat.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.stale_after_s / 5):
      try:
        owner = self._read()
        if owner is not None and owner["token"] != self.token:
          self.say(
              f"Warning: another run took over the lock of {self.workdir} "
              f"({_describe(owner)}); two runs may now write to it."
          )
          return
        self.path.write_text(self._owner_text())
      except OSError:  # a missed heartbeat is retried; staleness needs several in a row
        continue

  def _release_remote(self) -> None:
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    owner = self._read()
    if owner is not None and owner["token"] == self.token:
      self.path.unlink(missing_ok=True)

  # ------------------------------------------------------------------ public

  def acquire(self, settle_s: float = 1.0) -> "WorkdirLock":
    key = str(self.path)
    earlier = _HELD.pop(key, None)
    if earlier is not None:  # left by an earlier call in this process
      earlier.release()
    if self.local:
      self._acquire_local()
    else:
      self._acquire_remote(settle_s)
    _HELD[key] = self
    return self

  def release(self) -> None:
    """Gives the workdir up (idempotent)."""
    if _HELD.get(str(self.path)) is self:
      del _HELD[str(self.path)]
    if self.local and self.fd is not None:
      self._release_local()
    elif not self.local and not self._stop.is_set():
      self._release_remote()


class _NotPrimary:
  """What the other processes of a multi-host run hold: nothing to release."""

  def release(self) -> None:
    pass


def acquire(
    workdir: str,
    *,
    stale_after_s: float,
    say: Callable[[str], None] = print,
    settle_s: float = 1.0,
) -> WorkdirLock | _NotPrimary:
  """Takes the workdir's lock on process 0; raises :class:`WorkdirInUse` on every process
  when another run holds it."""
  primary = jax.process_index() == 0
  lock, refusal = None, None
  if primary:
    try:
      lock = WorkdirLock(workdir, stale_after_s=stale_after_s, say=say).acquire(settle_s)
    except WorkdirInUse as err:
      refusal = err
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if int(refused) and refusal is None:
      refusal = WorkdirInUse(
          f"Workdir {workdir} is in use by another run (process 0 says how); wait for it to "
          "finish or use another --workdir."
      )
  if refusal is not None:
    raise refusal
  return lock if lock is not None else _NotPrimary()
