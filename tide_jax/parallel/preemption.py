"""SIGTERM (the TPU/GPU preemption notice) -> checkpoint at the next step boundary, and a
wall-clock checkpoint cadence that bounds the work a notice-less loss costs.

``PreemptionGuard`` installs a SIGTERM handler that only sets a flag; the training loop
asks ``poll()`` after each step: ``stop`` (save and return) and ``save_due`` (at least
``checkpoint_every_s`` seconds since the last save). With several hosts both flags are
combined (any host -> every host, at the same step), because all hosts must join the same
checkpoint save.

Why a time bound: a Spot VM gets about 30 s between its notice and power-off, too little to
write a multi-GiB state to GCS, and a TPU slice without auto-checkpointing gets no SIGTERM
at all; what the last checkpoint is older than is what is lost.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import numpy as np


class Preempted(Exception):
  """Raised by the loop after the preemption checkpoint is safely written (exit code 0)."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
        f"Preempted: checkpoint of step {step} written to {workdir}; re-run the "
        "same command to resume."
    )
    self.step = step
    self.workdir = workdir


class PreemptionGuard:
  """Context manager: SIGTERM handler while training, the previous handler restored after.

  Args:
    check_every: with several processes, combine the hosts' flags every this many steps
      (a tiny all-gather); a single process checks its flag at every step for free.
    checkpoint_every_s: > 0: ``poll`` reports a save as due once this many seconds have
      passed since the guard started or ``saved()`` was last called; 0: never.
    clock: seconds, monotonic (tests pass a fake one).
  """

  def __init__(
      self,
      check_every: int = 1,
      checkpoint_every_s: float = 0.0,
      clock: Callable[[], float] = time.monotonic,
  ):
    self.check_every = max(int(check_every), 1)
    self.checkpoint_every_s = float(checkpoint_every_s)
    self._clock = clock
    self._last_save = clock()
    self._flag = threading.Event()
    self._previous = None
    self._installed = False

  def _handler(self, signum, frame):
    del signum, frame
    self._flag.set()

  def __enter__(self) -> "PreemptionGuard":
    # Signal handlers can only be installed from the main thread (not in notebook workers).
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def notified(self) -> bool:
    """Whether this process received SIGTERM."""
    return self._flag.is_set()

  def saved(self) -> None:
    """Restarts the wall-clock cadence (call after every checkpoint save)."""
    self._last_save = self._clock()

  def _save_due_here(self) -> bool:
    return (
        self.checkpoint_every_s > 0 and self._clock() - self._last_save >= self.checkpoint_every_s
    )

  def poll(self, step: int) -> tuple[bool, bool]:
    """``(stop, save_due)``, the same on every host (combined every ``check_every`` steps)."""
    import jax

    if jax.process_count() == 1:
      return self.notified(), self._save_due_here()
    if step % self.check_every:
      return False, False
    from jax.experimental import multihost_utils

    local = np.asarray([int(self.notified()), int(self._save_due_here())], np.int32)
    flags = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
    return bool(np.any(flags[:, 0])), bool(np.any(flags[:, 1]))

  def should_stop(self, step: int) -> bool:
    """True on every host once any host was notified (checked every ``check_every`` steps)."""
    return self.poll(step)[0]
