"""Shared fixtures.  Add new fixtures in their own section below; keep each one self-contained."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from libvirt_harness import LibvirtHarness, missing_binaries

OSINFO_DB = Path("/usr/share/osinfo")


# ----------------------------------------------------------------- real libvirt


@pytest.fixture(scope="session")
def libvirt() -> Iterator[LibvirtHarness]:
    """One private daemon for the whole session: starting libvirtd per test would dominate the run time.

    It is the harness's own libvirtd, never the machine's (tests/libvirt_harness.py says why), so the
    run neither depends on nor disturbs a libvirtd the developer already runs.  A developer machine
    without libvirt, or a run as non-root (a privileged daemon is needed for KVM), skips; CI (``CI``
    set) fails instead, so a broken CI image cannot turn the real-component tests into silent skips.
    """
    missing = missing_binaries()
    reason = ""
    if missing:
        reason = f"libvirt/QEMU binaries not installed: {', '.join(missing)} (run scripts/setup.sh test)"
    elif os.geteuid() != 0:
        reason = "the libvirt harness runs its own privileged libvirtd: run the tests as root"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    harness = LibvirtHarness()
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


# ----------------------------------------------------------------- osinfo-db


@pytest.fixture(scope="session")
def osinfo_db() -> Path:
    """Guest-OS facts come from the real database, never from a copy that could drift."""
    if not (OSINFO_DB / "os").is_dir():
        pytest.fail(f"osinfo-db not found at {OSINFO_DB} (Debian package osinfo-db; scripts/setup.sh)",
                    pytrace=False)
    return OSINFO_DB


# ----------------------------------------------------------------- engine inputs


@pytest.fixture(scope="session")
def osdb(osinfo_db: Path):  # type: ignore[no-untyped-def]
    """The real osinfo-db, indexed once per session."""
    from virtpolicy.inputs.guestos import OsinfoDB

    return OsinfoDB(osinfo_db)


@pytest.fixture(scope="session")
def host():  # type: ignore[no-untyped-def]
    """The embedded host bundle: a real x86_64 KVM host (libvirt 9.0 / QEMU 7.2)."""
    from virtpolicy.inputs.host import embedded_host

    return embedded_host()


@pytest.fixture(scope="session")
def numa_host(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A two-socket, four-cell host (support.four_node_host)."""
    from support import four_node_host

    return four_node_host(tmp_path_factory.mktemp("hosts"))


@pytest.fixture(scope="session")
def domain_schema():  # type: ignore[no-untyped-def]
    """libvirt's own RelaxNG schema for domains (Debian libvirt0)."""
    from lxml import etree

    path = Path("/usr/share/libvirt/schemas/domain.rng")
    if not path.exists():
        pytest.fail(f"{path} missing (Debian package libvirt0)", pytrace=False)
    return etree.RelaxNG(etree.parse(str(path)))
