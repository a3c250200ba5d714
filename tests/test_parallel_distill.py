"""Sharded distillation on 8 fake CPU devices equals the single-device run.

Three steps of ``train_and_evaluate`` per mesh; losses (every step) and final parameters
agree with the run on one device within 1e-5 (float32), for tide_shared and tide_cross on
meshes (data=8) and (data=2, fsdp=2, tensor=2), and with a synthetic LLaDA2 MoE teacher
laid out over (fsdp=4, expert=2). The step is compiled exactly once over 20 steps.
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests import parallel_fixtures as pf
from tide_jax import configs_lib
from tide_jax.parallel import sharding
from tide_jax.train import loop, optimizer

MESHES = [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("parallel"))
  train, evals = pf.corpus_files(os.path.join(root, "corpus"))
  byte_tok = pf.byte_tokenizer(os.path.join(root, "tok_byte"))
  bpe_tok = pf.bpe_tokenizer(
      os.path.join(root, "tok_bpe"), [os.path.join(os.path.dirname(train[0]), "json_decoder.py")]
  )
  return {
      "root": root,
      "train": train,
      "eval": evals,
      "byte": byte_tok,
      "bpe": bpe_tok,
      "tide_shared": dict(
          tokenizer=byte_tok,
          teacher_tokenizer=byte_tok,
          teacher_mask_id=257,
          teacher_checkpoint=pf.qwen_teacher(
              os.path.join(root, "t_byte"), pf.STUDENT_VOCAB, seed=1
          ),
      ),
      "tide_cross": dict(
          tokenizer=byte_tok,
          teacher_tokenizer=bpe_tok,
          teacher_mask_id=1,
          teacher_checkpoint=pf.qwen_teacher(os.path.join(root, "t_bpe"), pf.CROSS_VOCAB, seed=2),
      ),
  }


def run(setup, recipe, mesh, name, teacher=None, **overrides):
  kwargs = dict(setup[recipe] if teacher is None else teacher)
  kwargs.update(overrides)
  c = pf.tiny_config(
      recipe=recipe,
      train_files=setup["train"],
      eval_files=setup["eval"],
      cache_dir=os.path.join(setup["root"], f"cache_{recipe}"),
      mesh=mesh,
      **kwargs,
  )
  return loop.train_and_evaluate(c, os.path.join(setup["root"], name))


def initial_params(setup, recipe):
  """The parameters the runs start from (same seed), created on one device."""
  c = pf.tiny_config(
      recipe=recipe,
      train_files=setup["train"],
      eval_files=setup["eval"],
      cache_dir="",
      **setup[recipe],
  )
  model_cfg = configs_lib.student_model_config(c)
  tx, _ = optimizer.make_optimizer(c.optim, 3)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  _, _, shardings = loop.student_state_plan(c, model_cfg, tx, mesh)
  state = loop.init_student_state(c, model_cfg, tx, shardings)
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def host_params(out):
  return [np.asarray(x) for x in jax.tree.leaves(out["state"].params)]


def assert_same_run(ref, out):
  assert [h["step"] for h in out["history"]] == [1, 2, 3]
  for a, b in zip(ref["history"], out["history"]):
    for key in ("loss", "ce_loss", "distill/loss", "grad_norm"):
      assert abs(a[key] - b[key]) < TOL, (key, a[key], b[key])
  for a, b in zip(host_params(ref), host_params(out)):
    np.testing.assert_allclose(b, a, atol=TOL, rtol=0)


@pytest.mark.parametrize("recipe", ["tide_shared", "tide_cross"])
def test_sharded_distillation_equals_single_device(setup, recipe):
  ref = run(setup, recipe, {"num_devices": 1}, f"{recipe}_single")
  assert ref["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
  assert all(h["distill/loss"] > 0 for h in ref["history"])
  # Three steps really moved the parameters, far beyond the tolerance.
  moved = max(np.abs(a - b).max() for a, b in zip(host_params(ref), initial_params(setup, recipe)))
  assert moved > 100 * TOL
  for mesh in MESHES:
    out = run(setup, recipe, mesh, f"{recipe}_{'_'.join(map(str, mesh.values()))}")
    assert out["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh}
    assert_same_run(ref, out)
    if mesh.get("tensor") == 2:
      # The student's state is laid out by STUDENT_RULES: embed over fsdp, heads over tensor.
      q = out["state"].params["layers"][0]["attn"]["q"][...]
      assert q.sharding.spec == P("fsdp", "tensor", None)
      mu = out["state"].opt_state[1][0].mu["layers"][0]["attn"]["q"][...]
      assert mu.sharding.spec == P("fsdp", "tensor", None)


def test_moe_teacher_over_fsdp_and_expert_axes(setup):
  moe = dict(
      setup["tide_shared"],
      teacher_name="llada2",
      teacher_checkpoint=pf.llada2_teacher(os.path.join(setup["root"], "t_moe"), pf.STUDENT_VOCAB),
  )
  ref = run(setup, "tide_shared", {"num_devices": 1}, "moe_single", teacher=moe)
  out = run(
      setup, "tide_shared", {"data": 1, "fsdp": 4, "expert": 2}, "moe_fsdp_expert", teacher=moe
  )
  assert_same_run(ref, out)
  experts = out["teacher_params"]["layers"][1]["mlp"]["gate"][...]
  assert experts.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in experts.addressable_shards} == {experts.shape[0] // 2}


def test_step_compiles_once_over_twenty_steps(setup):
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration" and "train_step" in str(
        kwargs.get("fun_name", "")
    ):
      compiles.append(kwargs["fun_name"])

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = run(setup, "tide_cross", {"data": 2, "fsdp": 2, "tensor": 2}, "twenty", num_steps=20)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert out["step"] == 20 and len(out["history"]) == 20
  assert out["train_step_compilations"] == 1
  assert compiles == ["jit(train_step)"]
