import os
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
NOT_ROOT = 77  # cluster.sh's exit code when it would need root


def _run_cluster_sh(*args, timeout=900):
    return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable})


def _checked(result, what):
    if result.returncode == NOT_ROOT:
        pytest.skip(f"{what} needs root (apt-get, daemons run as root): {result.stderr.strip()}")
    if result.returncode:
        # Fail loudly: an environment that cannot install or start Slurm is a broken CI run.
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{result.stdout}\n"
                    f"{result.stderr}")


@pytest.fixture(scope="session")
def slurm_packages():
    """Slurm, munge and shellcheck installed (apt-get, once; a no-op when already there)."""
    if os.geteuid() != 0:
        pytest.skip("installing Slurm and running its daemons needs root")
    _checked(_run_cluster_sh("install"), "tests/slurm/cluster.sh install")


@pytest.fixture(scope="package")  # stopped once tests/slurm is done, not at the session's end
def slurm_cluster(slurm_packages, tmp_path_factory):
    """A local 8-node Slurm cluster; yields the environment for sbatch/scontrol/squeue."""
    directory = tmp_path_factory.mktemp("slurm")
    _checked(_run_cluster_sh("start", str(directory), timeout=180), "tests/slurm/cluster.sh start")
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
    try:
        yield env
    finally:
        stopped = _run_cluster_sh("stop", str(directory), timeout=120)
        assert stopped.returncode == 0, stopped.stderr
