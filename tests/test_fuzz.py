"""A mutation fuzzer over the domains in examples/ and tests/data: bad input is a one-line error, never a bug.

Each example takes one seed domain and applies a few mutations an app (or an attacker) could make:
attributes set to random strings, huge, negative or hex-garbage numbers; elements dropped, duplicated or
given garbage text; unknown and misplaced elements inserted. The CLI runs in-process
(`virtpolicy.cli.main`) and must answer every input with exit 0, 1 or 2, never "internal error" or a
traceback. Every exit-0 output must pass libvirt's own schema and re-solve to the same bytes.

Deterministic (derandomize) and bounded: VIRTPOLICY_FUZZ_EXAMPLES examples (default 300, well under 3 minutes).
"""

from __future__ import annotations

import copy
import io
import os
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lxml import etree

from virtpolicy import cli

REPO = Path(__file__).resolve().parent.parent
LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
EXAMPLES = int(os.environ.get("VIRTPOLICY_FUZZ_EXAMPLES", "300"))
SLOW_SECONDS = 10.0


def _seeds() -> list[tuple[str, bytes]]:
    found = []
    for path in sorted([*REPO.glob("examples/*.xml"), *REPO.glob("tests/data/**/*.xml")]):
        data = path.read_bytes()
        try:
            root = etree.fromstring(data)
        except etree.XMLSyntaxError:
            continue
        if root.tag == "domain":
            found.append((str(path.relative_to(REPO)), data))
    return found


SEEDS = _seeds()

NUMBERS = [
    "0", "1", "-1", "7", "8", "31", "32", "255", "256", "65535", "65536", "4294967295", "4294967296",
    "18446744073709551616", "9" * 40, "0x0", "0x1f", "0x20", "0xff", "0x100", "0xffffffff", "0xzz", "0x", "08",
    "010", "1f", "zz", "+1", " 2 ", "1e3", "1.5", "NaN", "0-4294967295", "0-3,^1", "3-1", "^0", "",
]
WORDS = [
    "virtio", "virtio-transitional", "virtio-non-transitional", "e1000e", "q35", "pc", "pc-q35-7.2", "pci",
    "pcie-root-port", "pcie-expander-bus", "pci-bridge", "none", "ide", "sata", "scsi", "usb", "nvme", "KiB",
    "MiB", "GiB", "TiB", "EiB", "XB", "bytes", "yes", "no", "on", "off", "kvm", "qemu", "hvm", "efi", "bios",
    "required", "legacy", "socket", "preferred", "\u00e9\u00e8", "a b", "<", "&", "'", "/domain/devices/disk[1]",
]
ATTRIBUTES = [
    "bus", "slot", "function", "domain", "index", "model", "type", "unit", "cpus", "memory", "id", "current",
    "queues", "ports", "machine", "arch", "dev", "node", "nodeset", "cellid", "policy", "priority", "name",
    "busNr", "chassis", "port", "multifunction", "version", "xpath", "mode", "firmware", "placement",
]
ELEMENTS = [
    "disk", "interface", "controller", "address", "target", "model", "driver", "video", "graphics", "hostdev",
    "memballoon", "rng", "tpm", "numa", "cell", "vcpu", "memory", "node", "source", "bogus", "cpu", "os",
]

values = st.sampled_from(NUMBERS) | st.sampled_from(WORDS) | st.text(max_size=12)
plausible = st.sampled_from(NUMBERS) | st.sampled_from(WORDS)
# devices libvirt's schema accepts as written, with {} holes the fuzzer fills: most of what passes the
# schema still reaches the engine, which is where a malformed value must not become a crash
DEVICES = [
    "<controller type='pci' index='{}' model='{}'/>",
    "<controller type='pci' index='{}' model='pcie-root-port'><address type='pci' bus='{}' slot='{}'/></controller>",
    "<controller type='pci' index='{}' model='pcie-expander-bus'><target busNr='{}'><node>{}</node></target>"
    "</controller>",
    "<controller type='usb' index='{}' model='{}'/>",
    "<controller type='scsi' index='{}' model='{}'/>",
    "<controller type='virtio-serial' index='{}' ports='{}'/>",
    "<interface type='user'><model type='{}'/><address type='pci' bus='{}' slot='{}' function='{}'/></interface>",
    "<interface type='network'><source network='default'/><model type='virtio'/><driver queues='{}'/></interface>",
    "<disk type='file' device='disk'><source file='/d.img'/><target dev='{}' bus='{}'/></disk>",
    "<disk type='file' device='disk'><source file='/d.img'/><target dev='vdz'/><address type='drive' controller='{}' "
    "bus='{}' target='{}' unit='{}'/></disk>",
    "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='{}' bus='{}' slot='{}' "
    "function='{}'/></source></hostdev>",
    "<video><model type='{}' heads='{}'/></video>",
    "<memballoon model='{}'/>",
    "<rng model='virtio'><backend model='random'>/dev/urandom</backend><address type='pci' bus='{}' slot='{}'/></rng>",
    "<memory model='dimm'><target><size unit='{}'>{}</size><node>{}</node></target></memory>",
    "<tpm model='{}'><backend type='emulator' version='2.0'/></tpm>",
]
DOMAIN_PARTS = [
    "<vcpu current='{}'>{}</vcpu>",
    "<memory unit='{}'>{}</memory>",
    "<cpu><numa><cell id='{}' cpus='{}' memory='{}' unit='MiB'/></numa></cpu>",
    "<numatune><memnode cellid='{}' mode='strict' nodeset='{}'/></numatune>",
    "<numatune><memory mode='strict' nodeset='{}'/></numatune>",
]


def _fill(draw: st.DrawFn, template: str) -> etree._Element:
    holes = template.count("{}")
    text = template.format(*(_attr_safe(draw(plausible)) for _ in range(holes)))
    try:
        return etree.fromstring(text)
    except etree.XMLSyntaxError:
        return etree.fromstring(template.replace("{}", "0"))


def _attr_safe(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


@st.composite
def mutants(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed with one to three mutations; the XML stays well-formed (malformed XML is test_xmlsafe's)."""
    name, data = draw(st.sampled_from(SEEDS))
    root = etree.fromstring(data)
    # weighted towards mutations libvirt's schema still accepts: those reach the engine itself
    kinds = ["attr", "attr", "new-attr", "text", "drop", "drop", "dup", "dup", "garbage", *["device"] * 5,
             *["domain-part"] * 3]
    for _ in range(draw(st.integers(1, 3))):
        # deepest-last order reversed: Hypothesis favours early choices, and the devices are the interesting end
        elements = [e for e in root.iter() if isinstance(e.tag, str)][::-1]
        el = draw(st.sampled_from(elements))
        kind = draw(st.sampled_from(kinds))
        if kind == "attr" and el.attrib:
            attr = draw(st.sampled_from(sorted(el.attrib)))
            el.set(attr, _printable(draw(plausible if draw(st.booleans()) else values)))
        elif kind in ("attr", "new-attr"):
            el.set(draw(st.sampled_from(ATTRIBUTES)), _printable(draw(values)))
        elif kind == "text":
            el.text = _printable(draw(values))
        elif kind == "drop" and el is not root:
            el.getparent().remove(el)
        elif kind == "dup" and el is not root:
            el.addnext(copy.deepcopy(el))
        elif kind == "device":
            devices = root.find("devices")
            if devices is None:
                devices = etree.SubElement(root, "devices")
            for _ in range(draw(st.integers(1, 3))):
                devices.append(_fill(draw, draw(st.sampled_from(DEVICES))))
        elif kind == "domain-part":
            part = _fill(draw, draw(st.sampled_from(DOMAIN_PARTS)))
            old = root.find(part.tag)
            if old is not None:
                root.replace(old, part)
            else:
                root.append(part)
        else:
            new = etree.Element(draw(st.sampled_from(ELEMENTS)))
            for attr in draw(st.lists(st.sampled_from(ATTRIBUTES), max_size=3, unique=True)):
                new.set(attr, _printable(draw(values)))
            (el if draw(st.booleans()) or el is root else el.getparent()).append(new)
    return name, etree.tostring(root)


def _printable(text: str) -> str:
    """XML 1.0 cannot hold control characters or surrogates; those are test_xmlsafe's business."""
    return "".join(c for c in text if c in "\t\n" or (c >= " " and not 0xD800 <= ord(c) <= 0xDFFF and c != "\ufffe"))


def _run(argv: list[str]) -> tuple[int, bytes, str]:
    """main() in-process, with stdout (bytes, the CLI writes XML to its buffer) and stderr captured."""
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(argv)
    finally:
        sys.stdout, sys.stderr = saved
    out.flush()
    return code, out.buffer.getvalue(), err.getvalue()  # type: ignore[attr-defined]


def _os_args(data: bytes) -> list[str]:
    return [] if LIBOSINFO.encode() in data else ["--os", "fedora37"]


@pytest.fixture(scope="module")
def strict_schema() -> etree.RelaxNG:
    path = Path("/usr/share/libvirt/schemas/domain.rng")
    if not path.exists():
        pytest.fail(f"{path} missing (Debian package libvirt0)", pytrace=False)
    return etree.RelaxNG(etree.parse(str(path)))


def test_seeds_exist() -> None:
    assert len(SEEDS) >= 3, SEEDS


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(case=mutants())
def test_mutated_domains_are_answered_never_crash(case: tuple[str, bytes], tmp_path_factory, strict_schema) -> None:  # type: ignore[no-untyped-def]
    seed, data = case
    work = tmp_path_factory.mktemp("fuzz")
    path = work / "mutant.xml"
    path.write_bytes(data)
    start = time.perf_counter()
    code, out, err = _run(["solve", str(path), "-q", *_os_args(data)])
    elapsed = time.perf_counter() - start
    context = f"seed {seed}, input:\n{data.decode(errors='replace')}"
    event(f"exit {code}")  # pytest --hypothesis-show-statistics shows the mix
    assert code in (0, 1, 2), f"exit {code}; {err}\n{context}"
    assert "internal error" not in err and "Traceback" not in err, f"{err}\n{context}"
    assert elapsed < SLOW_SECONDS, f"{elapsed:.1f} s\n{context}"
    if code == 1:
        errors = [line for line in err.splitlines() if line.startswith("virtpolicy: error:")]
        assert len(errors) == 1, f"expected one error line, got {err!r}\n{context}"
    if code != 0:
        return
    document = etree.fromstring(out)
    assert strict_schema.validate(document.getroottree()), f"{strict_schema.error_log}\n{context}"
    again = work / "solved.xml"
    again.write_bytes(out)
    code2, out2, err2 = _run(["solve", str(again), "-q", *_os_args(data)])
    assert code2 == 0, f"re-solve exit {code2}: {err2}\n{context}"
    if out2 != out:
        import difflib

        diff = "\n".join(difflib.unified_diff(out.decode().splitlines(), out2.decode().splitlines(), lineterm="", n=0))
        pytest.fail(f"re-solving changed the output:\n{diff[:2000]}\n{context}")
