"""The original virtuned draft's XML profile format, read into the same rules as TOML profiles.

    <profile name='spice-stuff'>
      <match><devices><graphics type='spice'/></devices></match>
      <add multiple='yes'><devices><redirdev bus='usb' type='spicevmc'/></devices></add>
      <defaults type='hard'><devices><interface><model type='e1000e'/></interface></devices></defaults>
      <remove><devices><memballoon/></devices></remove>
    </profile>

Each action element becomes one rule, conditioned on the profile's <match>. Strength comes from
`constraint=` or (as the draft's examples write it) `type=`: hard or soft, soft by default.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError, ProfileError
from virtpolicy.inputs.xmlsafe import parse_bytes
from virtpolicy.profiles.model import Profile, Rule, Snippet, read_profile_bytes

ACTIONS = {"add": "add", "default": "default", "defaults": "default", "remove": "remove"}


def _fragment(el: etree._Element) -> etree._Element:
    root = etree.Element("domain")
    for child in el:
        if isinstance(child.tag, str):
            root.append(etree.fromstring(etree.tostring(child)))
    return root


def load_xml_profile(path: Path) -> Profile:
    data = read_profile_bytes(path)
    try:
        root = parse_bytes(data, str(path)).getroot()
    except InputError as exc:
        raise ProfileError(str(exc)) from None
    if root.tag != "profile":
        raise ProfileError(f"{path}:{root.sourceline}: root element is <{root.tag}>, expected <profile>")
    name = root.get("name", "")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ProfileError(f"{path}:{root.sourceline}: <profile name='{name}'> must be lower-case letters, digits, '-'")
    match_el = root.find("match")
    match = Snippet("match", "auto", _fragment(match_el)) if match_el is not None else None
    rules = []
    for n, el in enumerate(root, start=1):
        if not isinstance(el.tag, str) or el.tag in ("match", "description"):
            continue
        if el.tag not in ACTIONS:
            raise ProfileError(
                f"{path}:{el.sourceline}: unknown element <{el.tag}> (accepted: match, add, defaults, remove)"
            )
        strength = el.get("constraint", el.get("type", "soft"))
        if strength not in ("hard", "soft"):
            raise ProfileError(f"{path}:{el.sourceline}: constraint='{strength}'; accepted: hard, soft")
        multiple = el.get("multiple", "auto")
        if multiple not in ("yes", "no", "auto"):
            raise ProfileError(f"{path}:{el.sourceline}: multiple='{multiple}'; accepted: yes, no, auto")
        action = ACTIONS[el.tag]
        rules.append(
            Rule(
                id=f"{el.tag}-{n}",
                profile=name,
                where=f"{path}:{el.sourceline}",
                match=match,
                hard=strength == "hard",
                snippets=(Snippet(action, multiple, _fragment(el)),),
            )
        )
    description = (root.findtext("description") or f"virtuned draft profile {name}").strip()
    return Profile(
        name=name,
        version=root.get("version", "0"),
        description=description,
        source=str(path),
        digest=hashlib.sha256(data).hexdigest()[:16],
        rules=tuple(rules),
    )
