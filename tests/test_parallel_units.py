"""Mesh from config, batch splitting, host interleaving, iterator positions across host
counts, distributed start-up layout, SIGTERM flag; and a checkpoint written on mesh
(data=8) resumed on (data=2, fsdp=4) with the same losses."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from tests import parallel_fixtures as pf
from tests.test_model_configs import QWEN3_0_6B
from tide_jax.models import dense
from tide_jax.models.config import decoder_config_from_hf
from tide_jax.parallel import distributed, host_data, preemption, sharding
from tide_jax.train import loop


def test_mesh_from_config_fills_and_shrinks_for_the_batch():
  mesh, notice = sharding.mesh_from_config({"data": -1, "tensor": 2}, global_batch=8)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1} and notice is None
  mesh, notice = sharding.mesh_from_config({"data": -1}, global_batch=4)
  assert dict(mesh.shape)["data"] == 4 and mesh.size == 4
  assert "4 of 8 devices are used" in notice
  mesh, _ = sharding.mesh_from_config({"data": 1, "num_devices": 1})
  assert mesh.size == 1
  with pytest.raises(ValueError, match="mesh.num_devices=9 but 8 devices are present"):
    sharding.mesh_from_config({"num_devices": 9})
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    sharding.mesh_from_config({"pipeline": 2})


def test_check_batch_size_notice_and_host_split():
  mesh = sharding.make_mesh({"data": 8})
  assert sharding.check_batch_size(16, mesh, sharding.STUDENT_RULES, 2) == (8, None)
  rows, notice = sharding.check_batch_size(4, mesh, sharding.STUDENT_RULES, 1)
  assert (
      rows == 4
      and "split 1 ways, not over all 8" in notice
      and "8 devices compute each row" in notice
  )
  with pytest.raises(ValueError, match="cannot be split over 3 hosts"):
    sharding.check_batch_size(8, mesh, sharding.STUDENT_RULES, 3)


@settings(max_examples=25, deadline=None)
@given(
    hosts=st.sampled_from([1, 2, 4]), rows_per_host=st.integers(1, 4), batch_index=st.integers(0, 3)
)
def test_interleaving_hosts_gives_the_single_reader_order(hosts, rows_per_host, batch_index):
  """Host p reads share positions p, p + P, ... of the permutation; after interleaving the
  global batch is exactly the single reader's batch (re-derived with NumPy)."""
  batch = hosts * rows_per_host
  perm = np.random.default_rng(hosts * 100 + rows_per_host).permutation(64)
  shares = [perm[p::hosts] for p in range(hosts)]
  local = [s[batch_index * rows_per_host : (batch_index + 1) * rows_per_host] for s in shares]
  out = np.asarray(host_data._interleave(jnp.asarray(np.concatenate(local)), hosts))
  np.testing.assert_array_equal(out, perm[batch_index * batch : (batch_index + 1) * batch])


def test_iterator_positions_convert_between_host_counts():
  base = {"version": 1, "seed": 0, "num_records": 100}
  saved = {
      "hosts": [dict(base, epoch=1, offset=6, process_index=p, process_count=2) for p in range(2)]
  }
  assert host_data.local_iterator_state(saved, 1, 2)["process_index"] == 1
  four = host_data.local_iterator_state(saved, 3, 4)
  assert (four["epoch"], four["offset"], four["process_index"], four["process_count"]) == (
      1,
      3,
      3,
      4,
  )
  assert host_data.local_iterator_state(saved, 0, 1)["offset"] == 12
  uneven = {
      "hosts": [
          dict(base, epoch=1, offset=6 + p, process_index=p, process_count=2) for p in range(2)
      ]
  }
  with pytest.raises(ValueError, match="written by 2 hosts and cannot be split over 4"):
    host_data.local_iterator_state(uneven, 0, 4)


def test_distributed_layout_from_environment():
  env = {
      "TIDE_COORDINATOR_ADDRESS": "10.0.0.2:8476",
      "TIDE_NUM_PROCESSES": "4",
      "TIDE_PROCESS_ID": "3",
  }
  assert distributed.explicit_layout(env=env) == ("10.0.0.2:8476", 4, 3)
  assert distributed.explicit_layout(env={}) is None
  with pytest.raises(ValueError, match="needs all of TIDE_COORDINATOR_ADDRESS"):
    distributed.explicit_layout(env={"TIDE_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="TIDE_PROCESS_ID=4 must lie in"):
    distributed.explicit_layout(env=dict(env, TIDE_PROCESS_ID="4"))
  assert distributed.detected_cluster({"SLURM_NTASKS": "2"}) == "slurm"
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed.detected_cluster({"SLURM_NTASKS": "1"}) is None
  assert distributed.detected_cluster({"TIDE_DISTRIBUTED": "auto"}) == "auto"


# The environment of one srun task of a two-node job with 8 GPUs per node, one task each.
SLURM_TWO_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_GPUS_ON_NODE": "8",
}


def test_one_slurm_task_per_node_drives_every_gpu_of_its_node(monkeypatch):
  from jax._src import clusters  # JAX's own SLURM auto-detection, the code that binds devices

  assert distributed.local_device_ids(SLURM_TWO_NODES) == list(range(8))
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "TPU_")) or name == "JAX_LOCAL_DEVICE_IDS":
      monkeypatch.delenv(name)
  for name, value in SLURM_TWO_NODES.items():
    monkeypatch.setenv(name, value)
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  # What JAX does alone: one GPU (number SLURM_LOCALID) for the node's only process.
  assert detect(None, None, None, None, None, 10)[3] == [0]
  _, count, index, ids = detect(None, None, None, distributed.local_device_ids(), None, 10)
  assert (count, index, len(ids)) == (2, 1, 8)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.maybe_initialize()
  assert calls == [{"local_device_ids": list(range(8))}]
  # One task per GPU keeps JAX's binding; an explicit list wins; TPU hosts stay unrestricted.
  per_gpu = dict(SLURM_TWO_NODES, SLURM_NTASKS="16", SLURM_STEP_TASKS_PER_NODE="8(x2)")
  assert distributed.local_device_ids(per_gpu) is None
  assert distributed.local_device_ids(dict(per_gpu, JAX_LOCAL_DEVICE_IDS="2,3")) == [2, 3]
  assert distributed.local_device_ids({"TPU_WORKER_HOSTNAMES": "a,b"}) is None
  with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS='0-7' is not a comma-separated"):
    distributed.local_device_ids({"JAX_LOCAL_DEVICE_IDS": "0-7"})


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.notified() and guard.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) == before


def test_wall_clock_cadence_saves_when_the_last_checkpoint_is_old(tmp_path):
  now = [100.0]
  with preemption.PreemptionGuard(checkpoint_every_s=60.0, clock=lambda: now[0]) as guard:
    assert guard.poll(1) == (False, False)
    now[0] += 59.5
    assert guard.poll(2) == (False, False)
    now[0] += 1.0  # 60.5 s since the guard started
    assert guard.poll(3) == (False, True)
    guard.saved()
    assert guard.poll(4) == (False, False)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.poll(5) == (True, False)
  with preemption.PreemptionGuard(clock=lambda: now[0]) as never:
    now[0] += 1e6
    assert never.poll(1) == (False, False)
  # In a run: a cadence shorter than a step saves after every step, although
  # checkpoint_every (1000) is never reached; keep_checkpoints=2 keeps the last two.
  train, evals = pf.corpus_files(str(tmp_path / "corpus"))
  c = pf.tiny_config(
      recipe="bd3lm",
      tokenizer=pf.byte_tokenizer(str(tmp_path / "tok")),
      teacher_tokenizer=None,
      train_files=train,
      eval_files=evals,
      cache_dir=str(tmp_path / "cache"),
      num_steps=3,
  )
  c.train.checkpoint_every_minutes = 1e-9
  c.train.keep_checkpoints = 5
  loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert sorted(int(p) for p in os.listdir(tmp_path / "run" / "checkpoints")) == [1, 2, 3]


def test_checkpoint_from_one_mesh_resumes_on_another(tmp_path):
  train, evals = pf.corpus_files(str(tmp_path / "corpus"))
  tok = pf.byte_tokenizer(str(tmp_path / "tok"))

  def config(mesh, stop_at=0):
    c = pf.tiny_config(
        recipe="bd3lm",
        tokenizer=tok,
        teacher_tokenizer=None,
        train_files=train,
        eval_files=evals,
        cache_dir=str(tmp_path / "cache"),
        mesh=mesh,
        num_steps=6,
    )
    c.train.stop_at_step = stop_at
    return c

  full = loop.train_and_evaluate(config({"data": 8}), str(tmp_path / "full"))
  split = str(tmp_path / "split")
  loop.train_and_evaluate(config({"data": 8}, stop_at=3), split)
  resumed = loop.train_and_evaluate(config({"data": 2, "fsdp": 4}), split)
  assert resumed["mesh"]["fsdp"] == 4 and [h["step"] for h in resumed["history"]] == [4, 5, 6]
  embed = resumed["state"].params["embed"][...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  for a, b in zip(full["history"][3:], resumed["history"]):
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5


def test_constrain_pins_activations_under_a_mesh_and_is_a_no_op_without():
  x = jnp.ones((8, 4, 6))
  assert sharding.constrain(x, ("batch", "length", "embed")) is x
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  f = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "length", "vocab")))
  with jax.set_mesh(mesh):
    out = f(jnp.ones((8, 4, 6)))
  assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  np.testing.assert_array_equal(np.asarray(out), 2.0)


def test_student_state_is_sharded_over_the_expert_axis_too():
  # The student has no experts: on a mesh laid out for an MoE teacher (fsdp=2 x expert=4)
  # its parameters (Qwen3-0.6B's shapes, abstract) split over all 8 devices, not over
  # fsdp's 2 with 4 copies.
  _, params = nnx.split(dense.abstract_decoder(decoder_config_from_hf(QWEN3_0_6B)), nnx.Param)
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
  shardings = sharding.state_shardings(params, mesh, sharding.STUDENT_RULES)
  leaves = jax.tree.leaves(params)
  total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  per_device = sum(
      np.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      for leaf, s in zip(leaves, jax.tree.leaves(shardings))
  )
  assert per_device < 1.01 * total / 8, (per_device, total)  # norm scales are replicated
  specs = {leaf.shape: s.spec for leaf, s in zip(leaves, jax.tree.leaves(shardings))}
  assert specs[(151936, 1024)] == jax.sharding.PartitionSpec(None, ("fsdp", "expert"))
