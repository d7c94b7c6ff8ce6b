"""Test configuration: 8 fake CPU devices for pmap / shard_map tests.

XLA reads the flag when the backend starts, so it is set before anything
imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("MPLBACKEND", "Agg")
# Notebooks (run by nbmake in child kernels that inherit this environment) use
# their tiny CI budget.
os.environ.setdefault("SAM_OPTAX_SMOKE", "1")
