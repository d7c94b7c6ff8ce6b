"""Two processes on JAX's real distributed runtime (gloo CPU collectives on localhost).

Each process holds 4 CPU devices; together they form one 8-device mesh with the
batch sharded across both. Both must end with identical params, equal to the same
program run by this (single, 8-device) process.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding

import multiprocess_worker as worker

HERE = pathlib.Path(__file__).resolve().parent


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_the_single_process_run(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
  outputs = [tmp_path / f"process{i}.npz" for i in range(2)]
  processes = [
      subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(i), str(port),
                        str(outputs[i])], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  logs = []
  for process in processes:
    try:
      logs.append(process.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      raise
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log[-4000:]

  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  single = worker.train(mesh, lambda value, spec: jax.device_put(value, NamedSharding(mesh, spec)))
  first, second = (dict(np.load(path)) for path in outputs)
  assert {int(first.pop("process_index")), int(second.pop("process_index"))} == {0, 1}
  assert set(first) == set(single) and len(single) == 6
  for key in single:
    np.testing.assert_array_equal(first[key], second[key])  # identical on both processes
    np.testing.assert_allclose(first[key], single[key], rtol=1e-5, atol=1e-7)
