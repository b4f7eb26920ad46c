"""One local Ray cluster for the session's cluster tests (``ray.init`` on 127.0.0.1 with 4
logical CPUs on this 2-core machine: two engine replicas, the router and a data actor fit), so
that Serve, Data and actor tests share its start-up; shut down after the last test of this
directory (package scope), so that its processes do not idle through the rest of the suite.

The whole directory skips when Ray is not installed (the ``lmforge[ray]`` extra)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

ray = pytest.importorskip("ray")

CLUSTER_CPUS = 4


@pytest.fixture(scope="package")
def ray_cluster():
    """The cluster's address (``host:port`` of its GCS), for ``ray.init(address=...)`` or a
    CLI's ``--ray-address`` in a subprocess."""
    if not ray.is_initialized():
        ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch thread in this process: the workers and actors compute on the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def scaled_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with its matrices x10 (``tests/training/conftest.py::load_scaled``), saved
    as a checkpoint: Ray workers and actors load the model from a path, as the trainer does."""
    directory = tmp_path_factory.mktemp("scaled_llama")
    shutil.copytree(tiny_llama_dir, directory, dirs_exist_ok=True)
    weights = load_file(directory / "model.safetensors")
    save_file({k: v * 10 if v.dim() == 2 else v for k, v in weights.items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    return directory
