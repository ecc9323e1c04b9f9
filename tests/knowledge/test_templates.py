"""templates.toml: every device the engine may add has a template, and each one is valid libvirt XML."""

from __future__ import annotations

import itertools

import pytest
from lxml import etree

from virtpolicy.knowledge.catalog import catalog
from virtpolicy.knowledge.templates import device_classes, new_device

ADDABLE = [cls for cls in catalog().classes.values() if cls.singleton]


def test_every_singleton_class_has_a_template() -> None:
    assert {cls.name for cls in ADDABLE} <= set(device_classes())


@pytest.mark.parametrize("cls", ADDABLE, ids=lambda c: c.name)
def test_every_value_makes_a_domain_libvirt_accepts(cls, domain_schema) -> None:
    names = list(cls.variables)
    for combo in itertools.product(*(cls.variables[n].values for n in names)):
        values = dict(zip(names, combo, strict=True))
        if "none" in combo:
            continue
        domain = etree.fromstring(
            "<domain type='kvm'><name>t</name><memory>1048576</memory>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>"
        )
        devices = domain.find("devices")
        for el in new_device(cls.name, values):
            devices.append(el)
        assert domain_schema.validate(domain), (cls.name, values, str(domain_schema.error_log.last_error))


def test_values_are_quoted_not_spliced() -> None:
    (el,) = new_device("video", {"model": "vga' bogus='1"})
    assert el.find("model").get("type") == "vga' bogus='1" and el.find("model").get("bogus") is None
