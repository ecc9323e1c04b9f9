"""The schema's device memo against plain RelaxNG validation: the two must agree on every document.

virtpolicy.inputs.schema accepts a domain whose devices were all accepted before by validating it with
stand-ins for its devices. This script is the evidence that this gives libxml2's own verdict: it takes
the domains the engine renders from examples/, tests/data/ and the libvirt corpus (the outputs the
strict schema sees) and the corpus domains as written (what the relaxed and strict input checks see),
applies random mutations (values changed or dropped, elements removed, duplicated or added, text put
between elements, devices repeated), and compares, for each document, full validation with the memo's
answer, twice (cold and warm), and that the document comes back unchanged. Exit status 1 on any
difference.

Run: .venv/bin/python benchmarks/check_validation_memo.py [--mutations N] [--seed S] [--corpus N]
"""

from __future__ import annotations

import argparse
import collections
import copy
import random
import sys
from pathlib import Path

from _benchutil import REPO
from lxml import etree

from virtpolicy import Engine
from virtpolicy.core.solve import Solution
from virtpolicy.core.solve import solve as run_solver
from virtpolicy.inputs import schema
from virtpolicy.outputs.render import render

CORPUS = Path("/work/main/.cache/libvirt-corpus/tests/qemuxml2xmloutdata")
PROFILE_SETS = ((), ("modern-q35",), ("windows", "secure-boot"), ("numa-aligned", "hotplug-ready"))
VALUES = ("", "0", "1", "0x1f", "0x100", "-1", "abc", "virtio", "pci", "on", "yes", "x y", "99999999999", "q35")
NEW_CHILDREN = ("address", "model", "target", "bogus", "memballoon", "alias")


def mutate(root: etree._Element, rng: random.Random) -> None:
    """One random change, the kinds a wrong template, profile or render step could make."""
    elements = [el for el in root.iter() if isinstance(el.tag, str)]
    el = rng.choice(elements)
    kind = rng.randrange(9)
    parent = el.getparent()
    if kind == 0 and el.attrib:
        el.set(rng.choice(list(el.attrib)), rng.choice(VALUES))
    elif kind == 1 and el.attrib:
        del el.attrib[rng.choice(list(el.attrib))]
    elif kind == 2 and parent is not None:
        parent.remove(el)
    elif kind == 3 and parent is not None:
        el.addnext(copy.deepcopy(el))
    elif kind == 4:
        el.text = rng.choice(("  ", "text", "\n    ", "5"))
    elif kind == 5:
        etree.SubElement(el, rng.choice(NEW_CHILDREN), type=rng.choice(VALUES))
    elif kind == 6 and parent is not None:
        el.tail = rng.choice((" x ", "\n", "  "))
    elif kind == 7:
        el.set(rng.choice(("type", "model", "index", "bus", "slot", "name")), rng.choice(VALUES))
    else:
        devices = root.find("devices")
        if devices is not None and len(devices):
            devices.append(copy.deepcopy(rng.choice(list(devices))))


def documents(engine: Engine, corpus: int) -> list[tuple[str, etree._ElementTree]]:
    """(which schema, tree): every rendered output (strict), every corpus domain as written (both)."""
    files = sorted((REPO / "examples").glob("*.xml")) + sorted((REPO / "tests" / "data").rglob("*.xml"))
    files += sorted(CORPUS.glob("*.xml"))[:corpus]
    found: list[tuple[str, etree._ElementTree]] = []
    for path in files:
        if path.parent == CORPUS:
            tree = etree.parse(str(path), etree.XMLParser(remove_blank_text=True, resolve_entities=False))
            found += [("relaxed", tree), ("strict", tree)]
        for profiles in PROFILE_SETS:
            try:
                domain = engine._domain(path, None, None)
                os_key = "generic" if path.parent == CORPUS else None
                built = engine._build(domain, profiles, os_key, "strict", None, None)
                outcome = run_solver(built.problem)
            except Exception:  # noqa: BLE001 - inputs the engine refuses have no output to check
                continue
            if isinstance(outcome, Solution):
                found.append(("strict", render(built, outcome)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=6, help="mutated copies of each document")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--corpus", type=int, default=400, help="libvirt corpus domains to include")
    args = parser.parse_args()
    if not schema.available():
        print("libvirt's schema is not installed (Debian libvirt0): nothing to compare")
        return 1
    rng = random.Random(args.seed)
    schemas = {"strict": schema._strict(), "relaxed": schema._relaxed()}
    tally: collections.Counter[str] = collections.Counter()
    wrong = 0
    for which, tree in documents(Engine(), args.corpus):
        rng_schema = schemas[which]
        assert rng_schema is not None
        variants = [tree]
        for _ in range(args.mutations):
            changed = copy.deepcopy(tree)
            for _ in range(rng.randint(1, 3)):
                mutate(changed.getroot(), rng)
            if rng.random() < 0.5:
                etree.indent(changed, space="  ")
            variants.append(changed)
        for doc in variants:
            before = etree.tostring(doc)
            full = bool(rng_schema.validate(doc))
            cold = schema._accepts(rng_schema, doc)
            warm = schema._accepts(rng_schema, doc)
            same = etree.tostring(doc) == before
            tally[f"{which} {'valid' if full else 'invalid'}"] += 1
            if not (full == cold == warm and same):
                wrong += 1
                print(f"DIFFERENT ({which}): full={full} memo={cold},{warm} unchanged={same}")
                print(before.decode()[:2000])
    print(", ".join(f"{count} {kind}" for kind, count in sorted(tally.items())), f"- {wrong} different")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
