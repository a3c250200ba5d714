"""Wall-clock times of training steps from a run's TensorBoard event files.

``metrics.jsonl`` holds no timestamps, but every TensorBoard scalar carries the wall time
at which the loop wrote it, right after the step's metrics came back from the device.
Training throughput is read from there: consecutive steps of one event file are
``(tokens per step) x (steps) / (seconds)`` apart. Each event file is one process's
writer, so a resumed run's files are read separately and the pause between them never
counts as a slow step.

The files are TFRecord streams (8-byte little-endian length, 4-byte length CRC, payload,
4-byte payload CRC) of ``tensorboard.Event`` protos; they are parsed with the proto
classes shipped in tensorboardX. CRCs are not checked; a record cut short by a killed
writer ends the file and is counted.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterator

import numpy as np
from etils import epath
from tensorboardX.proto import event_pb2

_HEADER = 12  # uint64 length + uint32 CRC of the length
_FOOTER = 4  # uint32 CRC of the payload


@dataclasses.dataclass(frozen=True)
class StepTimes:
  """When each training step's scalars were written, one array pair per event file.

  Attributes:
    files: per event file, ``(steps int64 [n], wall_times float64 [n])`` sorted by step.
    truncated_records: records cut short at the end of a file (a killed writer).
  """

  files: tuple[tuple[np.ndarray, np.ndarray], ...]
  truncated_records: int


def read_records(data: bytes) -> tuple[list[bytes], int]:
  """Splits a TFRecord byte string into payloads: ``(payloads, truncated_count)``."""
  payloads, offset = [], 0
  while offset < len(data):
    if offset + _HEADER > len(data):
      return payloads, 1
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + _HEADER + length
    if end + _FOOTER > len(data):
      return payloads, 1
    payloads.append(data[offset + _HEADER : end])
    offset = end + _FOOTER
  return payloads, 0


def _scalar_events(payloads: list[bytes], tag: str) -> Iterator[tuple[int, float]]:
  for payload in payloads:
    event = event_pb2.Event.FromString(payload)
    if any(value.tag == tag for value in event.summary.value):
      yield int(event.step), float(event.wall_time)


def read_step_times(tensorboard_dir: epath.Path, tag: str = "train/loss") -> StepTimes | None:
  """Wall times of the scalar ``tag`` in every event file of ``tensorboard_dir``.

  Returns None when the directory holds no event file (TensorBoard logging was off).
  """
  if not tensorboard_dir.exists():
    return None
  paths = sorted(p for p in tensorboard_dir.iterdir() if "tfevents" in p.name)
  if not paths:
    return None
  files, truncated = [], 0
  for path in paths:
    payloads, cut = read_records(path.read_bytes())
    truncated += cut
    events = sorted(_scalar_events(payloads, tag))
    if events:
      steps, times = zip(*events)
      files.append((np.asarray(steps, np.int64), np.asarray(times, np.float64)))
  return StepTimes(tuple(files), truncated)


def tokens_per_second(times: StepTimes, tokens_per_step: int) -> tuple[np.ndarray, np.ndarray]:
  """Throughput between consecutive logged steps of each event file.

  Returns:
    ``(steps int64 [m], tokens_per_s float64 [m])``: the value at step s covers the steps
    since the previous row of the same file (evaluation and checkpoint time included,
    as in the console's progress line).
  """
  steps, rates = [], []
  for file_steps, file_times in times.files:
    step_delta = np.diff(file_steps)
    time_delta = np.diff(file_times)
    keep = (step_delta > 0) & (time_delta > 0)
    steps.append(file_steps[1:][keep])
    rates.append(tokens_per_step * step_delta[keep] / time_delta[keep])
  if not steps:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  order = np.argsort(np.concatenate(steps), kind="stable")
  return np.concatenate(steps)[order], np.concatenate(rates)[order]
