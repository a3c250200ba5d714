"""Expert-parallel MoE: per-device memory, routed work and traffic fall as 1/devices.

Compile only (8 fake CPU devices): one MoE block (tiled dispatch) at a fixed global token
count on meshes of ``expert`` = 2, 4, 8 and ``data`` x ``expert``. Per device it reads the
compiled temporaries (``memory_analysis``), the matmul FLOPs and collective bytes of the
optimized HLO with loop bodies times their trip counts (tests/hlo_counts.py: the row-tile
loop at its bound, the exchange loop as one round, i.e. a load within the capacity), and
checks each falls at least as ``1 / devices`` within 20% relative to expert=2. Sizes are
small except the token count (16,384 tokens, 32 experts, 4 active), so the dispatch buffers
dominate.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tide_jax.parallel.hlo_counts import count_hlo
from tide_jax.models import moe
from tide_jax.parallel import sharding

HIDDEN, WIDTH, EXPERTS, TOP_K = 64, 32, 32, 4
TOKENS = 16384
TOLERANCE = 1.2  # measured / (baseline x 2 / devices) at most this
MESHES = [
    {"expert": 2},
    {"expert": 4},
    {"expert": 8},
    {"data": 2, "expert": 2},
    {"data": 2, "expert": 4},
    {"data": 4, "expert": 2},
]


def compiled_block(sizes: dict) -> tuple[int, str]:
  """(temporary bytes per device, optimized HLO) of one MoE block on mesh ``sizes``."""
  devices = 1
  for n in sizes.values():
    devices *= n
  mesh = sharding.make_mesh(sizes, jax.devices()[:devices])
  router = moe.RouterConfig(EXPERTS, TOP_K, n_group=4, topk_group=2, routed_scaling_factor=2.5)
  block = nnx.eval_shape(
      lambda: moe.MoEBlock(
          HIDDEN,
          WIDTH,
          1,
          router,
          use_expert_bias=True,
          param_dtype=jnp.float32,
          rngs=nnx.Rngs(params=0),
          dispatch="tiled",
          mesh=mesh,
      )
  )
  graphdef, state = nnx.split(block)
  shardings = sharding.state_shardings(state, mesh, sharding.TEACHER_RULES)
  state = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), state, shardings
  )
  tokens = jax.ShapeDtypeStruct(
      (TOKENS, HIDDEN), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp", "expert")))
  )
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


@pytest.fixture(scope="module")
def measured():
  out = {}
  for sizes in MESHES:
    temporaries, hlo = compiled_block(sizes)
    counts = count_hlo(hlo)
    out[tuple(sizes.items())] = dict(
        devices=sizes.get("data", 1) * sizes["expert"],
        temporaries=temporaries,
        flops=counts.dot_flops,
        collective_bytes=counts.collective_bytes,
        hlo=hlo,
        unbounded=counts.unbounded_loops,
    )
  return out


@pytest.mark.parametrize("quantity", ["temporaries", "flops", "collective_bytes"])
def test_per_device_cost_falls_as_one_over_devices(measured, quantity):
  base = measured[(("expert", 2),)]
  report = {
      key: (m["devices"], m[quantity] / base[quantity] * m["devices"] / base["devices"])
      for key, m in measured.items()
  }
  # Each entry: devices, and the measured cost over its ideal 1/devices share.
  assert all(ratio <= TOLERANCE for _, ratio in report.values()), report


def test_router_runs_on_local_tokens_only(measured):
  """No device holds router scores for the global batch (``[tokens, experts]``)."""
  for key, m in measured.items():
    assert f"[{TOKENS},{EXPERTS}]" not in m["hlo"], key
    # The exchange loop is the only loop whose trip count is data dependent.
    assert len(m["unbounded"]) == 1, (key, m["unbounded"])
