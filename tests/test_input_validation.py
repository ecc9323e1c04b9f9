"""Input validation before anything else: libvirt's schema, typed bounded values, bounded reads, exit codes.

Bad input is one line naming the input and the place (file:line and XPath) and what would be accepted,
exit 1; never a traceback, an "internal error" or a hang, and never gigabytes of memory for a tiny input.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree

from virtpolicy import cli
from virtpolicy.errors import InputError
from virtpolicy.inputs import schema
from virtpolicy.inputs.domain import MAX_DEVICES, Domain
from virtpolicy.inputs.units import MAX_MEMORY_BYTES, UnitError, bytes_per, to_kib
from virtpolicy.inputs.xmlsafe import MAX_INPUT_BYTES, read_file

REPO = Path(__file__).resolve().parent.parent
SOURCE = "app.xml"
PARTIAL = (
    "<domain type='kvm'><name>p</name>\n<memory unit='MiB'>1024</memory>\n{domain}"
    "<os><type arch='x86_64'>hvm</type></os>\n<devices>\n{devices}</devices></domain>\n"
)
DISK = "<disk type='file' device='disk'><source file='/var/lib/d.img'/></disk>\n"


def partial(domain: str = "", devices: str = DISK) -> bytes:
    return PARTIAL.format(domain=domain, devices=devices).encode()


def refused(data: bytes) -> str:
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        Domain.from_bytes(data, SOURCE)
    assert time.perf_counter() - start < 2.0, "refusing took too long"
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{SOURCE}:"), message
    return message


def run(*argv: str) -> tuple[int, str, str]:
    """The CLI in-process: exit code, stdout, stderr."""
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(list(argv))
    finally:
        sys.stdout, sys.stderr = saved
    out.flush()
    return code, out.buffer.getvalue().decode(), err.getvalue()  # type: ignore[attr-defined]


def one_line_error(code: int, err: str, *names: str) -> str:
    assert code == 1, f"exit {code}: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert "internal error" not in lines[0] and "Traceback" not in err, lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


# ----------------------------------------------------------------- libvirt's schema on the input


@pytest.mark.parametrize(
    "data",
    [
        partial(),
        partial().replace(b" type='kvm'", b""),  # the engine picks kvm or qemu
        partial(devices="<disk type='file' device='disk'><source file='/d'/><target bus='sata'/></disk>"),
        b"<domain type='kvm'><name>minimal</name></domain>",
    ],
    ids=["disk-without-target", "no-domain-type", "target-bus-only", "name-only"],
)
def test_partial_domains_the_engine_completes_are_accepted(data: bytes) -> None:
    """The documented relaxation (schema.RELAXED): what the engine fills may be missing, nothing else."""
    assert Domain.from_bytes(data, SOURCE).root.tag == "domain"


def test_schema_error_is_one_line_with_file_line_xpath_and_lxml_message() -> None:
    data = partial(devices="<interface type='user'>\n<address type='pci' bus='zz' slot='0x01'/></interface>\n")
    message = refused(data)
    assert message.startswith(f"{SOURCE}:6: /domain/devices/interface[1]/address/@bus: "), message
    assert "libvirt's domain schema rejects this: bus='zz'" in message, message


@pytest.mark.parametrize(
    ("data", "where", "fragment"),
    [
        (b"<domain type='kvm'>\n<memory>1024</memory></domain>", "/domain", "Expecting an element name"),
        (partial("<vcpu>4294967296</vcpu>\n"), "/domain/vcpu", "4294967296"),
        (partial().replace(b"unit='MiB'", b"unit='XB'"), "/domain/memory/@unit", "unit"),
        (partial(devices="<interface type='user'><address type='pci' slot='0x01' function='9'/></interface>"),
         "/domain/devices/interface[1]/address/@function", "function='9'"),
        (partial().replace(b"type='kvm'", b"type='virtualbox'"), "/domain", "type"),
    ],
    ids=["no-name", "vcpu-overflow", "odd-unit", "function-over-7", "unknown-hypervisor"],
)
def test_schema_rejections_name_the_place(data: bytes, where: str, fragment: str) -> None:
    message = refused(data)
    assert f": {where}: libvirt's domain schema rejects this: " in message, message
    assert fragment in message, message


def test_validate_output_uses_the_unrelaxed_schema() -> None:
    """Output must be what libvirt accepts as it is: no relaxation."""
    data = partial()  # a disk without <target>: fine as input, not as output
    schema.validate_input(etree.fromstring(data).getroottree(), SOURCE)
    with pytest.raises(schema.OutputRejected) as info:
        schema.validate_output(data, "<stdout>")
    message = str(info.value)
    assert message.startswith("virtpolicy would have printed a domain libvirt's schema rejects: <stdout>:"), message
    assert "/domain/devices/disk[1]" in message and "\n" not in message


def test_every_solved_example_passes_the_unrelaxed_schema() -> None:
    for example in sorted((REPO / "examples").glob("*.xml")):
        code, out, err = run("solve", str(example), "-q")
        assert code in (0, 2), err
        if code == 0:
            schema.validate_output(out.encode(), str(example))


def test_validation_costs_well_under_a_millisecond_per_domain() -> None:
    """DESIGN.md: about 0.2 ms per domain, once the schema is compiled (once per process)."""
    tree = etree.parse(str(REPO / "examples" / "windows10.xml"))
    schema.validate_input(tree, "warm-up")
    start = time.perf_counter()
    for _ in range(200):
        schema.validate_input(tree, "windows10.xml")
    per_domain = (time.perf_counter() - start) / 200
    assert per_domain < 0.002, f"{per_domain * 1000:.2f} ms per domain"


# ----------------------------------------------------------------- sizes checked before expansion


def test_huge_vcpu_range_in_a_numa_cell_is_refused_without_expanding_it() -> None:
    cells = "<cpu><numa><cell id='0' cpus='0-4294967295' memory='1048576'/></numa></cpu>\n"
    message = refused(partial("<vcpu>4</vcpu>\n" + cells))
    assert "/domain/cpu/numa/cell/@cpus" in message and "names vCPU 4294967295" in message, message
    assert "/domain/vcpu is 4" in message


def test_too_many_numa_cells_are_refused() -> None:
    cells = "".join(f"<cell id='{i}' cpus='0' memory='1'/>" for i in range(129))
    message = refused(partial(f"<vcpu>4</vcpu>\n<cpu><numa>{cells}</numa></cpu>\n"))
    assert "129 NUMA cells" in message and "128" in message, message


def test_current_vcpus_beyond_vcpu_is_refused() -> None:
    message = refused(partial("<vcpu current='8'>4</vcpu>\n"))
    assert "/domain/vcpu/@current" in message, message


def test_vcpus_beyond_the_host_maximum_stay_a_conflict(tmp_path: Path) -> None:
    """Within libvirt's schema but beyond what the host's machine allows: a conflict (exit 2), as before."""
    path = tmp_path / "many-vcpus.xml"
    path.write_bytes(partial("<vcpu>4000</vcpu>\n"))
    code, _, err = run("solve", str(path), "--os", "fedora37", "-q")
    assert code == 2, err
    assert "vCPUs exceed" in err


def test_memory_beyond_libvirts_limit_is_refused() -> None:
    message = refused(partial().replace(b"<memory unit='MiB'>1024</memory>", b"<memory unit='EiB'>9</memory>"))
    assert "/domain/memory" in message and "exceeds libvirt's limit" in message, message


def test_too_many_devices_are_refused_before_anything_is_built() -> None:
    devices = "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>" * (MAX_DEVICES + 1)
    start = time.perf_counter()
    message = refused(partial(devices=devices))
    assert time.perf_counter() - start < 1.0
    assert f"{MAX_DEVICES + 1} devices" in message and str(MAX_DEVICES) in message, message


@pytest.mark.parametrize(
    ("address", "attr", "fragment"),
    [
        ("bus='0x00' slot='1f'", "slot", "'1f' is not a decimal or 0x-hex number"),
        ("bus='0x00' slot='08'", "slot", "leading 0 as octal"),
        ("bus='007' slot='0x01'", "bus", "leading 0 as octal"),
    ],
)
def test_pci_address_values_are_typed(address: str, attr: str, fragment: str) -> None:
    """Values the schema's patterns let through but libvirt (strtol, base 0) would not read as written."""
    message = refused(partial(devices=f"<interface type='user'><address type='pci' {address}/></interface>"))
    assert f"/domain/devices/interface[1]/address/@{attr}" in message and fragment in message, message


def test_host_nodeset_is_bounded() -> None:
    message = refused(partial("<numatune><memory mode='strict' nodeset='0-99999999'/></numatune>\n"))
    assert "/domain/numatune/memory/@nodeset" in message, message


# ----------------------------------------------------------------- libvirt's units


@pytest.mark.parametrize(
    ("unit", "size"),
    [
        ("b", 1), ("bytes", 1), ("KB", 1000), ("k", 1024), ("KiB", 1024), ("MB", 10**6), ("M", 2**20),
        ("MiB", 2**20), ("GB", 10**9), ("G", 2**30), ("GiB", 2**30), ("TB", 10**12), ("T", 2**40),
        ("TiB", 2**40), ("PB", 10**15), ("PiB", 2**50), ("EB", 10**18), ("EiB", 2**60), ("mib", 2**20),
    ],
)
def test_units_follow_libvirt(unit: str, size: int) -> None:
    assert bytes_per(unit) == size


def test_sizes_round_up_to_kib_and_stop_at_libvirts_limit() -> None:
    assert to_kib("1", "b") == 1
    assert to_kib("1024", None) == 1024
    assert to_kib(str(MAX_MEMORY_BYTES), "bytes") == -(-MAX_MEMORY_BYTES // 1024)
    for value, unit in (("8", "EiB"), (str(MAX_MEMORY_BYTES + 1), "b"), ("9" * 80, "KiB")):
        with pytest.raises(UnitError, match="exceeds libvirt's limit"):
            to_kib(value, unit)
    for value, unit in (("1", "XB"), ("1", "kibi"), ("-1", "KiB"), ("1.5", "GiB"), ("0x10", "KiB")):
        with pytest.raises(UnitError):
            to_kib(value, unit)


# ----------------------------------------------------------------- bounded reads


def test_dev_zero_is_refused_after_16_mib() -> None:
    start = time.perf_counter()
    with pytest.raises(InputError, match="larger than 16 MiB"):
        read_file(Path("/dev/zero"))
    assert time.perf_counter() - start < 5.0
    code, _, err = run("solve", "/dev/zero")
    one_line_error(code, err, "/dev/zero", "larger than 16 MiB")


def test_oversized_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.xml"
    with big.open("wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(InputError, match=r"big\.xml: file is larger than 16 MiB"):
        read_file(big)


def test_fifo_without_a_writer_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.xml"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "solve", str(fifo), "--os", "fedora37"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    one_line_error(done.returncode, done.stderr.decode(), str(fifo), "malformed XML")


def test_stdin_is_bounded_too() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "solve", "-", "--os", "fedora37"],
        stdin=open("/dev/zero", "rb"),  # noqa: SIM115
        capture_output=True,
        timeout=30,
        check=False,
    )
    one_line_error(done.returncode, done.stderr.decode(), "<stdin>", "larger than 16 MiB")


def test_device_xml_and_host_files_are_bounded(tmp_path: Path) -> None:
    domain = tmp_path / "d.xml"
    domain.write_bytes(partial())
    code, _, err = run("device", "add", str(domain), "/dev/zero", "--os", "fedora37")
    one_line_error(code, err, "/dev/zero", "larger than 16 MiB")
    code, _, err = run("solve", str(domain), "--os", "fedora37", "--host", "/dev/zero")
    one_line_error(code, err, "/dev/zero")


# ----------------------------------------------------------------- exit codes and write errors


@pytest.mark.parametrize(
    "argv",
    [["solve", "--bogus"], ["frobnicate"], [], ["solve", "--format", "yaml"], ["explain", "--max-conflicts", "x"]],
    ids=["unknown-option", "unknown-command", "no-command", "bad-choice", "bad-int"],
)
def test_usage_errors_exit_1_in_one_line(argv: list[str]) -> None:
    """Exit 2 means 'conflicting requirements' for this tool; a usage error is bad input."""
    code, _, err = run(*argv)
    line = one_line_error(code, err)
    assert ": error: " in line, line


def test_help_and_version_still_exit_0() -> None:
    assert run("--help")[0] == 0
    assert run("--version")[0] == 0


@pytest.mark.parametrize("command", ["solve", "explain"])
def test_unwritable_output_is_one_line_naming_the_path(command: str, tmp_path: Path) -> None:
    domain = tmp_path / "d.xml"
    domain.write_bytes(partial())
    for target in (tmp_path, tmp_path / "missing" / "out.xml"):
        code, out, err = run(command, str(domain), "--os", "fedora37", "-o", str(target))
        one_line_error(code, err, str(target), "cannot write")
        assert out == ""


def test_host_capture_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run("host", "capture", "--connect", "test:///default", str(blocker / "bundle"))
    one_line_error(code, err, str(blocker / "bundle"))


# ----------------------------------------------------------------- host data and the osinfo cache


def test_unreadable_host_file_is_one_line(tmp_path: Path) -> None:
    from virtpolicy.inputs.host import EMBEDDED_BUNDLE

    bundle = tmp_path / "host"
    bundle.mkdir()
    (bundle / "capabilities.xml").mkdir()  # a directory where a file belongs
    for file in EMBEDDED_BUNDLE.glob("domcaps-*.xml"):
        (bundle / file.name).write_bytes(file.read_bytes())
    domain = tmp_path / "d.xml"
    domain.write_bytes(partial())
    code, _, err = run("solve", str(domain), "--os", "fedora37", "--host", str(bundle))
    one_line_error(code, err, str(bundle / "capabilities.xml"))


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{not json", b"[]", b'{"signature": null}', b"\xff\xfe", None],
    ids=["empty", "truncated", "list", "no-index", "binary", "wrong-index"],
)
def test_corrupted_osinfo_index_cache_is_rebuilt(garbage: bytes | None, tmp_path: Path, osinfo_db: Path) -> None:
    from virtpolicy.inputs.guestos import OsinfoDB

    first = OsinfoDB(osinfo_db, cache_dir=tmp_path)
    cache = first._cache_file()  # noqa: SLF001
    if garbage is None:  # intact JSON, current signature, but an index naming files outside the database
        data = json.loads(cache.read_bytes())
        data["index"] = dict.fromkeys(data["index"], "/etc/passwd")
        garbage = json.dumps(data).encode()
    cache.write_bytes(garbage)
    again = OsinfoDB(osinfo_db, cache_dir=tmp_path)
    assert again.lookup("fedora37").id.endswith("/37")
    assert json.loads(cache.read_bytes())["index"]["fedora37"].startswith(str(osinfo_db))


def test_device_xml_for_device_add_is_validated_and_named_from_its_own_root(tmp_path: Path) -> None:
    domain = tmp_path / "d.xml"
    domain.write_bytes(partial())
    device = tmp_path / "nic.xml"
    device.write_bytes(b"<interface type='user'>\n<model type='virtio'/>\n<address type='pci' bus='zz'/></interface>\n")
    code, _, err = run("device", "add", str(domain), str(device), "--os", "fedora37")
    one_line_error(code, err, f"{device}:3: /interface/address/@bus", "libvirt's domain schema rejects this")


@pytest.mark.parametrize("value", ["-1", "x", "9" * 5000, "4294967296"])
def test_host_numbers_are_bounded(value: str, tmp_path: Path) -> None:
    from virtpolicy.inputs.host import EMBEDDED_BUNDLE

    text = (EMBEDDED_BUNDLE / "domcaps-x86_64-q35-kvm.xml").read_text().replace("max='288'", f"max='{value}'")
    caps = tmp_path / "domcaps.xml"
    caps.write_text(text)
    domain = tmp_path / "d.xml"
    domain.write_bytes(partial())
    code, _, err = run("solve", str(domain), "--os", "fedora37", "--host", str(caps))
    one_line_error(code, err, str(caps), "is not a number from 0 to 4294967295")


def test_pci_controller_index_is_a_bus_number() -> None:
    message = refused(partial(devices="<controller type='pci' index='4294967295' model='pcie-root-port'/>"))
    assert "/domain/devices/controller[1]/@index" in message and "0-255" in message, message


def test_output_rejection_names_the_first_device_libvirt_would_refuse() -> None:
    """When several devices are wrong, the message still names one of them, not just <devices>."""
    bad = "<interface type='user'><address type='pci' bus='0x101' slot='0x01'/></interface>\n"
    data = PARTIAL.format(domain="", devices=bad * 2).replace("<disk", "<x").encode()
    with pytest.raises(schema.OutputRejected, match=r"/domain/devices/interface\[1\]/address/@bus: "):
        schema.validate_output(data, "<stdout>")


def test_profile_files_are_read_bounded(tmp_path: Path) -> None:
    domain = tmp_path / "d.xml"
    domain.write_bytes(partial())
    code, _, err = run("solve", str(domain), "--os", "fedora37", "--profile", "/dev/zero")
    one_line_error(code, err, "/dev/zero", "larger than 16 MiB")
