"""SIGTERM (the TPU/GPU preemption notice) -> checkpoint at the next step boundary.

``PreemptionGuard`` installs a SIGTERM handler that only sets a flag; the training loop
asks ``should_stop()`` after each step, saves and returns. With several hosts the flags
are combined (any host notified -> every host stops at the same step), because all hosts
must join the same checkpoint save.
"""

from __future__ import annotations

import signal
import threading

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
  """

  def __init__(self, check_every: int = 1):
    self.check_every = max(int(check_every), 1)
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

  def should_stop(self, step: int) -> bool:
    """True on every host once any host was notified (checked every ``check_every`` steps)."""
    import jax

    if jax.process_count() == 1:
      return self.notified()
    if step % self.check_every:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(int(self.notified()), np.int32))
    return bool(np.any(np.asarray(flags)))
