"""`plan capacity`: instances per host follow Nova's NUMA fit (each guest cell on its own host cell with
the CPUs and memory left), huge pages, over-commit ratios and passed-through devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import cli, four_node_host, partial_domain

from virtpolicy.inputs.domain import Domain
from virtpolicy.plan.capacity import Demand, instances_on

FEDORA = "http://fedoraproject.org/fedora/37"
DISK = "<disk type='file' device='disk'><source file='/var/lib/images/c.qcow2'/></disk>"


def _template(vcpus: int, mib: int, cells: list[tuple[str, int]] | None = None, extra: str = "") -> Domain:
    numa = ""
    if cells:
        rows = "".join(f"<cell id='{i}' cpus='{c}' memory='{m}' unit='MiB'/>" for i, (c, m) in enumerate(cells))
        numa = f"<cpu><numa>{rows}</numa></cpu>"
    xml = partial_domain("cap", FEDORA, "q35", DISK, numa + extra)
    sizes = f"<memory unit='MiB'>{mib}</memory><vcpu>{vcpus}</vcpu>"
    xml = xml.replace("<memory unit='MiB'>512</memory><vcpu>1</vcpu>", sizes)
    return Domain.from_bytes(xml.encode(), "cap.xml")


@pytest.fixture(scope="module")
def numa_host(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return four_node_host(tmp_path_factory.mktemp("cap"))  # 4 cells x 4 CPUs x 16 GiB


def test_guest_cells_each_take_a_host_cell(numa_host) -> None:  # type: ignore[no-untyped-def]
    two_cells = Demand.of(_template(4, 8192, [("0-1", 4096), ("2-3", 4096)]))
    assert instances_on(numa_host, two_cells) == 4  # 16 CPUs / 4, and 8 guest cells in 4 host cells of 4 CPUs
    wide = Demand.of(_template(10, 8192, [("0-4", 4096), ("5-9", 4096)]))
    assert instances_on(numa_host, wide) == 0, "a 5-CPU guest cell fits no 4-CPU host cell, whatever the total"
    flat = Demand.of(_template(10, 8192))
    assert instances_on(numa_host, flat) == 1, "without guest NUMA cells only the totals count"


def test_memory_and_over_commit(numa_host) -> None:  # type: ignore[no-untyped-def]
    big = Demand.of(_template(1, 20 * 1024, [("0", 20 * 1024)]))
    assert instances_on(numa_host, big) == 0, "a 20 GiB guest cell does not fit a 16 GiB host cell"
    small = Demand.of(_template(2, 1024))
    assert instances_on(numa_host, small) == 8  # CPU-bound: 16 / 2
    assert instances_on(numa_host, small, cpu_ratio=4.0) == 32
    assert instances_on(numa_host, small, cpu_ratio=100.0) == 64  # then memory-bound: 64 GiB / 1 GiB


def test_huge_pages_need_free_pages(numa_host) -> None:  # type: ignore[no-untyped-def]
    hugepages = "<memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>"
    demand = Demand.of(_template(2, 1024, extra=hugepages))
    assert demand.page_kib == 2048
    assert instances_on(numa_host, demand) == 0, "the host reports no 2 MiB pages"


def _two_hosts_and_a_small_template(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of the embedded host (2 CPUs, 4.8 GiB each) and a 1-vCPU, 512 MiB template."""
    from virtpolicy.inputs.host import EMBEDDED_BUNDLE

    fleet = tmp_path / "fleet"
    fleet.mkdir()
    shutil.copytree(EMBEDDED_BUNDLE, fleet / "a")
    shutil.copytree(EMBEDDED_BUNDLE, fleet / "b")
    template = tmp_path / "small.xml"
    template.write_text(partial_domain("small", FEDORA, None, DISK))
    return fleet, template


def test_cli_over_a_fleet(tmp_path: Path) -> None:
    fleet, template = _two_hosts_and_a_small_template(tmp_path)
    proc = cli("plan", "capacity", str(template), "--fleet", str(fleet), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (row,) = report["templates"]
    assert row["classes"][0]["per_host"] == 2  # the embedded host: 2 CPUs, 4.8 GiB
    assert row["fleet_total"] == 4


def test_current_usage_lowers_what_still_fits(tmp_path: Path) -> None:
    fleet, template = _two_hosts_and_a_small_template(tmp_path)
    usage = tmp_path / "usage.toml"
    usage.write_text('[host."a"]\ncpus = 1\nmemory_mib = 1024\n')
    proc = cli("plan", "capacity", str(template), "--fleet", str(fleet), "--usage", str(usage), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["templates"]
    assert row["hosts_in_use"] == [{"host": "a", "more_instances": 1}]
    assert row["fleet_total"] == 3  # a: one more; b: two
    usage.write_text('[host."zz"]\ncpus = 1\n')
    bad = cli("plan", "capacity", str(template), "--fleet", str(fleet), "--usage", str(usage))
    assert bad.returncode == 1 and b"no such host in the fleet" in bad.stderr
