"""Planning on a real Dask LocalCluster (two worker processes) gives the same answers as the process
pool, byte for byte; a scheduler that does not answer is a one-line error."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostvariants import no_tpm, variant
from support import cli

from virtpolicy.inputs.host import EMBEDDED_BUNDLE

distributed = pytest.importorskip("distributed", reason="Dask is installed by scripts/setup.sh test")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dask-fleet")
    for name in ("a", "b"):
        shutil.copytree(EMBEDDED_BUNDLE, base / name)
    variant(EMBEDDED_BUNDLE, base / "c", no_tpm)  # a host without a TPM: another class, another answer
    return base


def test_plan_hosts_on_a_local_cluster_matches_the_process_pool(cluster: str, fleet: Path) -> None:
    args = ("plan", "hosts", "examples/windows10.xml", "--fleet", str(fleet), "--profile", "windows-11",
            "--format", "json")  # fmt: skip
    pool = cli(*args, "--workers", "2")
    dask = cli(*args, "--scheduler", cluster)
    assert pool.returncode == 0, pool.stderr
    assert dask.returncode == 0, dask.stderr
    assert dask.stdout == pool.stdout
    assert b'"runs": false' in dask.stdout, "the TPM-less class must be refused, or the comparison is empty"


def test_a_scheduler_that_does_not_answer(fleet: Path) -> None:
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(fleet), "--scheduler", "tcp://127.0.0.1:9")
    assert proc.returncode == 1
    line = proc.stderr.decode().strip()
    assert "no Dask scheduler answers" in line and "\n" not in line, line
