"""Profiles in TOML, the format of the shipped library (see profiles.library for where they come from).

    [[rule]]
    id = "windows-clock"
    when = 'os.is_windows'
    prefer = { "clock.offset" = ["localtime"] }
    strength = "soft"          # or "hard"
    priority = 10

Effects: `require` / `forbid` / `prefer` (variable -> values), `add` / `default` / `remove` (domain XML
snippets, `multiple` = yes | no | auto), `set` (XPath -> derived expression), `drivers` (osinfo device
ids or named driver packs the guest is declared to have). Everything is validated at load time, and
every error names file:line.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from lxml import etree

from virtpolicy.errors import ProfileError
from virtpolicy.knowledge.catalog import driver_packs
from virtpolicy.knowledge.vocabulary import profile_vocabulary
from virtpolicy.profiles.model import (
    Profile,
    Rule,
    check_expression,
    check_snippet,
    parse_snippet,
    read_profile_bytes,
    variable_values,
)

MAX_RULES = 500
PROFILE_KEYS = {"name", "version", "description", "use_when", "rule", "allow_passthrough"}
RULE_KEYS = {
    "id",
    "equal",
    "when",
    "strength",
    "priority",
    "require",
    "forbid",
    "prefer",
    "add",
    "default",
    "remove",
    "multiple",
    "set",
    "drivers",
    "description",
}


def _line_of_rules(text: str) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"^[ \t]*\[\[rule\]\]", text, re.M)]


def _line_of_key(text: str, start_line: int, key: str) -> int:
    lines = text.splitlines()
    for n in range(start_line, len(lines) + 1):
        if n > start_line and lines[n - 1].lstrip().startswith("[["):
            break
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", lines[n - 1]):
            return n
    return start_line


def _rule(
    raw: object, index: int, profile: str, path: Path, text: str, line: int, passthrough: list[str] | None = None
) -> Rule:
    """One [[rule]]; pass-through its snippets write is appended to `passthrough` (None: not opted in)."""
    where = f"{path}:{line}"
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a [[rule]] must be a table")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (accepted: {', '.join(sorted(RULE_KEYS))})"
        )
    rid = raw.get("id")
    if not isinstance(rid, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", rid):
        raise ProfileError(f"{where}: rule needs an id of lower-case letters, digits, '.', '_' or '-'")
    where = f"{path}:{_line_of_key(text, line, 'id')}"
    strength = raw.get("strength", "soft")
    if strength not in ("hard", "soft"):
        raise ProfileError(f"{where}: strength = '{strength}'; accepted: hard, soft")
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 1000:
        raise ProfileError(f"{where}: priority must be a whole number from 0 to 1000")
    when = None
    if "when" in raw:
        if not isinstance(raw["when"], str):
            raise ProfileError(f"{where}: 'when' must be a string")
        when = check_expression(raw["when"], f"{path}:{_line_of_key(text, line, 'when')}")
    snippets = []
    multiple = raw.get("multiple", "auto")
    for action in ("add", "default", "remove"):
        if action in raw:
            if not isinstance(raw[action], str):
                raise ProfileError(f"{where}: '{action}' must be a domain XML snippet (a string)")
            key_where = f"{path}:{_line_of_key(text, line, action)}"
            snippet = parse_snippet(raw[action], key_where, action, multiple)
            found = check_snippet(snippet, key_where, rid, passthrough is not None)
            if passthrough is not None:
                passthrough.extend(found)
            snippets.append(snippet)
    derive = {}
    if "set" in raw:
        if not isinstance(raw["set"], dict):
            raise ProfileError(f"{where}: 'set' must be a table of XPath = expression")
        for xpath, source in raw["set"].items():
            parent, _, attr = xpath.rpartition("/@") if "/@" in xpath else (xpath.removesuffix("/text()"), "", "text()")
            try:
                etree.XPath(parent)
            except etree.XPathSyntaxError:
                parent = ""
            if not parent or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*|text\(\)", attr):
                raise ProfileError(f"{where}: set: '{xpath}' must be an element XPath ending in /@attribute or /text()")
            if re.search(r"(?<!:):(?!:)", parent.rpartition("/")[2].split("[", 1)[0]):  # a prefix, not an axis
                # the last step is created when missing: never a namespaced (pass-through) element
                raise ProfileError(
                    f"{where}: set: '{xpath}': the element it sets must be a plain libvirt element, without a "
                    "namespace prefix"
                )
            derive[xpath] = check_expression(str(source), f"{path}:{_line_of_key(text, line, 'set')}")
    drivers: list[str] = []
    packs = driver_packs()  # osinfo-supplement.toml [[pack]]
    for d in raw.get("drivers", []):
        if isinstance(d, str) and d in packs:
            drivers.extend(packs[d])
        elif isinstance(d, str) and d.startswith("http"):
            drivers.append(d)
        else:
            raise ProfileError(
                f"{where}: drivers: '{d}' is neither an osinfo device id nor a driver pack ({', '.join(packs)})"
            )
    effects = {}
    for effect in ("require", "forbid", "prefer"):
        if effect in raw:
            effects[effect] = variable_values(f"{path}:{_line_of_key(text, line, effect)}", effect, raw[effect])
    equal = {}
    if "equal" in raw:
        if not isinstance(raw["equal"], dict):
            raise ProfileError(f"{where}: 'equal' must be a table of variable = expression")
        known = profile_vocabulary()
        for var, source in raw["equal"].items():
            if var not in known:
                raise ProfileError(f"{where}: unknown variable '{var}' in 'equal'")
            equal[var] = check_expression(str(source), f"{path}:{_line_of_key(text, line, 'equal')}")
    if not (effects or snippets or derive or drivers or equal):
        raise ProfileError(
            f"{where}: rule '{rid}' has no effect (require, forbid, prefer, add, default, remove, set, drivers)"
        )
    return Rule(
        id=rid,
        profile=profile,
        where=where,
        when=when,
        hard=strength == "hard",
        priority=priority,
        require=effects.get("require", {}),
        forbid=effects.get("forbid", {}),
        prefer=effects.get("prefer", {}),
        snippets=tuple(snippets),
        derive=derive,
        equal=equal,
        drivers=tuple(drivers),
        description=str(raw.get("description", "")),
    )


def load_toml_profile(path: Path) -> Profile:
    data_bytes = read_profile_bytes(path)
    try:
        text = data_bytes.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ProfileError(f"{path}:1: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = match.group(1) if match else "1"
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ProfileError(f"{path}:{line}: TOML syntax: {message}") from None
    except RecursionError:
        raise ProfileError(f"{path}:1: TOML nests too deeply") from None
    unknown = set(data) - PROFILE_KEYS
    if unknown:
        raise ProfileError(
            f"{path}:1: unknown key(s) {', '.join(sorted(unknown))} (accepted: {', '.join(sorted(PROFILE_KEYS))})"
        )
    for key in ("name", "version", "description"):
        if not isinstance(data.get(key), str) or not data.get(key):
            raise ProfileError(f"{path}:1: profile needs a '{key}' string")
    name = data["name"]
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ProfileError(f"{path}:1: profile name '{name}' must be lower-case letters, digits and '-'")
    allow = data.get("allow_passthrough", False)
    if not isinstance(allow, bool):
        line = _line_of_key(text, 1, "allow_passthrough")
        raise ProfileError(f"{path}:{line}: allow_passthrough = {allow!r}; accepted: true, false")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or len(raw_rules) > MAX_RULES:
        raise ProfileError(f"{path}:1: 'rule' must be a list of at most {MAX_RULES} [[rule]] tables")
    lines = _line_of_rules(text)
    passthrough: list[str] | None = [] if allow else None
    rules = [
        _rule(r, i, name, path, text, lines[i] if i < len(lines) else 1, passthrough) for i, r in enumerate(raw_rules)
    ]
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise ProfileError(f"{rule.where}: duplicate rule id '{rule.id}'")
        seen.add(rule.id)
    return Profile(
        name=name,
        version=data["version"],
        description=data["description"],
        source=str(path),
        digest=hashlib.sha256(data_bytes).hexdigest()[:16],
        rules=tuple(rules),
        use_when=str(data.get("use_when", "")),
        allow_passthrough=allow,
        passthrough=tuple(passthrough or ()),
    )
