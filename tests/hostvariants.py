"""Host bundles that differ from a real one the way real hosts differ: no secure-boot loader (old
firmware), no TPM emulator, fewer Hyper-V enlightenments. Each edit turns a domcapabilities document into
what libvirt reports on such a host; the tests and benchmarks/fleetgen.py share them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lxml import etree

Edit = Callable[[etree._Element], None]


def edit_domcaps(bundle: Path, edit: Edit) -> Path:
    """Apply `edit` to every domcapabilities file of a bundle, in place."""
    for file in sorted(bundle.glob("domcaps-*.xml")):
        tree = etree.parse(str(file))
        edit(tree.getroot())
        tree.write(str(file))
    return bundle


def variant(source: Path, target: Path, *edits: Edit) -> Path:
    """A copy of the bundle `source` at `target` with `edits` applied."""
    shutil.copytree(source, target)
    for edit in edits:
        edit_domcaps(target, edit)
    return target


def no_secure_boot(root: etree._Element) -> None:
    """Firmware without the secure-boot loader: no secboot/ms images, `secure` offers only 'no'."""
    loader = root.find("os/loader")
    if loader is None:
        return
    for value in loader.findall("value"):
        if "secboot" in (value.text or "") or ".ms." in (value.text or ""):
            loader.remove(value)
    secure = loader.find("enum[@name='secure']")
    for value in secure.findall("value") if secure is not None else ():
        if value.text == "yes":
            secure.remove(value)


def no_tpm(root: etree._Element) -> None:
    """What libvirt reports without swtpm: `<tpm supported='no'/>`, no enums."""
    tpm = root.find("devices/tpm")
    if tpm is not None:
        for child in list(tpm):
            tpm.remove(child)
        tpm.set("supported", "no")


def no_hyperv(root: etree._Element) -> None:
    hyperv = root.find("features/hyperv")
    if hyperv is not None:
        for child in list(hyperv):
            hyperv.remove(child)
        hyperv.set("supported", "no")


def fewer_hyperv(root: etree._Element) -> None:
    """Half of the Hyper-V enlightenments (an older kernel or QEMU)."""
    features = root.find("features/hyperv/enum[@name='features']")
    for value in features.findall("value")[len(features) // 2 :] if features is not None else ():
        features.remove(value)


def small_fleet(base: Path, source: Path) -> Path:
    """Four hosts in three classes: h01 and h02 (twins), old-firmware (no secure boot), no-tpm."""
    shutil.copytree(source, base / "h01")
    shutil.copytree(source, base / "h02")
    variant(source, base / "old-firmware", no_secure_boot)
    variant(source, base / "no-tpm", no_tpm)
    return base
