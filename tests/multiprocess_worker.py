"""One process of the two-process test (tests/test_multiprocess.py), and the training it runs.

Run as ``python tests/multiprocess_worker.py PROCESS_ID PORT OUT.npz``: it joins JAX's
distributed runtime on localhost (2 processes x 4 CPU devices, gloo collectives),
builds one 8-device mesh, trains grouped SAM and grouped F-SAM for a few steps with
the batch sharded across both processes, and saves the params it holds.
"""

import os
import sys

import numpy as np

STEPS = 3
GROUP_SIZE = 4
GLOBAL_BATCH = 64


def data():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32)
  y = rng.normal(size=(GLOBAL_BATCH,)).astype(np.float32)
  w = (rng.normal(size=(6,)) * 0.5).astype(np.float32)
  return {"x": x, "y": y}, {"w": w, "b": np.zeros((1,), np.float32)}


def train(mesh, make_global):
  """Grouped SAM and F-SAM on ``mesh``; ``make_global(array, spec)`` builds global arrays."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec

  import sam_optax

  def loss_fn(params, batch):
    prediction = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return 0.5 * jnp.mean((prediction - batch["y"]) ** 2)

  grad_fn = jax.grad(loss_fn)
  batch_np, params_np = data()
  batch = {k: make_global(v, PartitionSpec("data")) for k, v in batch_np.items()}
  results = {}
  for name, perturbation in (
      ("sam", sam_optax.sam_perturb(grad_fn, rho=0.3, group_size=GROUP_SIZE)),
      ("fsam", sam_optax.fsam_perturb(grad_fn, rho=0.3, sigma=0.5, lmbda=0.8,
                                      group_size=GROUP_SIZE)),
  ):
    tx = optax.chain(perturbation, optax.sgd(0.2, momentum=0.9))
    params = {k: make_global(v, PartitionSpec()) for k, v in params_np.items()}
    opt_state = jax.tree.map(lambda v: make_global(np.asarray(v), PartitionSpec()),
                             tx.init(params_np))

    @jax.jit
    def step(params, opt_state, batch):
      updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params, batch=batch)
      return optax.apply_updates(params, updates), opt_state

    with jax.set_mesh(mesh):
      for _ in range(STEPS):
        params, opt_state = step(params, opt_state, batch)
    for k, v in params.items():
      assert v.sharding.is_fully_replicated
      results[f"{name}/{k}"] = np.asarray(v.addressable_data(0))
    if name == "fsam":
      for k, v in opt_state[0].gradient_ema.items():
        results[f"fsam/ema/{k}"] = np.asarray(v.addressable_data(0))
  return results


def main(process_id, port, out):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax
  from jax.sharding import AxisType, NamedSharding

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

  def make_global(value, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  results = train(mesh, make_global)
  results["process_index"] = np.asarray(jax.process_index())
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
