"""The train step splits its work across the mesh: per-device cost falls as 1/devices.

Compile only, 8 fake CPU devices, real vocabularies (151,936 for the student and the
shared-tokenizer teacher, 128,256 for the cross-tokenizer one), tiny depth; the step is
the one ``train.loop`` compiles (``train.abstract_step``, tests/scaling_fixtures.py). For ``bd3lm``, ``tide_shared``
(pipeline B: shared tokenizer, TIDAL + CompDemo, ``[x0 ; x_t]`` teacher), ``tide_cross``
(pipeline A: chunks, Reverse CALM) and ``tide_cross`` with an LLaDA2 MoE teacher, at a
fixed global batch on meshes data = 1, 2, 4, 8 and fsdp = 8, per device:

* matmul FLOPs of the optimized HLO, loop bodies times their trip counts
  (tide_jax/parallel/hlo_counts.py), fall at least as 1/n within 20% of the one-device figure;
* the batch-dependent compiled temporaries (temporaries at global batch 2B minus those at
  B: activations, the teacher's hidden states, per-row statistics) fall at least as 1/n
  within 20%. The rest of the temporaries is bounded by design and independent of the
  batch: one ``[block, V]`` float32 block of the fused objectives and parameter-sized
  gradient and optimizer buffers (which shrink with fsdp, not with data parallelism);
* no collective moves an array with a vocabulary-sized dimension other than a parameter
  (the output kernels gathered once per step, their gradients reduced once), and the
  collectives that move no parameter total less than 1 MiB per device per step. That
  bound is about a hundred thousand times below 1% of one step's matmul work counted at
  one byte per FLOP (the interconnects of TPU and GPU slices move one byte in the time
  of about a thousand FLOPs), and 55,000 times below the 55.6 GiB per step the
  distillation term moved before it ran per device.
"""

import math
import re

import pytest

from tests import scaling_fixtures as sf

MESHES = [{"data": 1}, {"data": 2}, {"data": 4}, {"data": 8}, {"fsdp": 8}]
BATCH, LENGTH = 16, 64
TOLERANCE = 1.2
ACTIVATION_COLLECTIVES = 1 << 20  # bytes per device per step


def devices(sizes):
  return math.prod(sizes.values())


def _is_parameter(shape, parameters, most: int = 8) -> bool:
  """Whether ``shape`` is a parameter's shape or one of its shards (at most ``most`` ways);
  a 2-D parameter also in its transposed layout (the tied embedding as output kernel)."""
  candidates = set(parameters) | {p[::-1] for p in parameters if len(p) == 2}
  for p in candidates:
    if len(p) == len(shape) and all(s and q % s == 0 for s, q in zip(shape, p)):
      if math.prod(p) // max(math.prod(shape), 1) <= most:
        return True
  return False


def _dims(result: str) -> list[tuple[int, ...]]:
  return [
      tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result)
  ]


@pytest.fixture(scope="module")
def measured():
  """(setup, mesh index, batch) -> (temporary bytes, HloCounts, parameter shapes)."""
  cache = {}

  def get(name, index, batch=BATCH):
    key = (name, index, batch)
    if key not in cache:
      step = sf.compile_step(name, MESHES[index], batch=batch, length=LENGTH)
      cache[key] = (step.memory()["temporaries"], step.counts(), step.parameter_shapes())
    return cache[key]

  return get


@pytest.mark.parametrize("name", list(sf.SETUPS))
def test_per_device_work_and_temporaries_fall_as_one_over_devices(measured, name):
  base_temp, base, _ = measured(name, 0)
  base_batch_temp = measured(name, 0, 2 * BATCH)[0] - base_temp
  assert base_batch_temp > 0
  for index, sizes in enumerate(MESHES[1:], start=1):
    n = devices(sizes)
    temp, counts, _ = measured(name, index)
    assert counts.dot_flops <= TOLERANCE * base.dot_flops / n, (sizes, counts.dot_flops)
    if index in (3, 4):  # data=8 and fsdp=8: the batch-dependent temporaries
      batch_temp = measured(name, index, 2 * BATCH)[0] - temp
      assert batch_temp <= TOLERANCE * base_batch_temp / n, (sizes, batch_temp, base_batch_temp)


@pytest.mark.parametrize("name", list(sf.SETUPS))
def test_only_parameters_cross_devices_at_vocabulary_width(measured, name):
  setup = sf.SETUPS[name]
  vocabularies = {sf.QWEN_VOCAB, setup.teacher_vocab} - {0}
  for index in (3, 4):
    _, counts, parameters = measured(name, index)
    activation_bytes = 0.0
    for opcode, result, moved in counts.collective_ops:
      shapes = [s for s in _dims(result) if math.prod(s) > 4]  # scalars: metrics, loss sums
      if not shapes:
        continue
      wide = [s for s in shapes if any(v in s for v in vocabularies)]
      # A vocabulary-wide collective moves a kernel (or its gradient), never logits.
      assert all(_is_parameter(s, parameters) for s in wide), (opcode, result)
      if not all(_is_parameter(s, parameters) for s in shapes):
        activation_bytes += moved
    assert activation_bytes < ACTIVATION_COLLECTIVES, (MESHES[index], activation_bytes)
