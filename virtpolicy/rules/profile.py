"""Profiles: reusable bundles of requirements and preferences, read from TOML (or the draft's XML).

A profile is data. Each rule has an id, an optional condition, and effects on the solver's variables:

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.models.catalog import catalog
from virtpolicy.models.machines import families
from virtpolicy.models.pci import pci_variables
from virtpolicy.models.xmlsafe import parse_bytes
from virtpolicy.rules.expr import ExprError, Expression, parse
from virtpolicy.rules.facts import FACT_NAMES, FUNCTION_NAMES
from virtpolicy.rules.tables import engine_defaults

MAX_PROFILE_BYTES = 256 * 1024
MAX_RULES = 500
PROFILE_KEYS = {"name", "version", "description", "use_when", "rule"}
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
SHIPPED = Path(__file__).parent / "profiles"

# named driver packs a profile may declare (osinfo ids a guest gains when the pack is installed)
DRIVER_PACKS: dict[str, tuple[str, ...]] = {
    "virtio-win": tuple(
        f"http://pcisig.com/pci/1af4/{d}"
        for d in (
            "1000",
            "1001",
            "1002",
            "1003",
            "1004",
            "1005",
            "1041",
            "1042",
            "1043",
            "1044",
            "1045",
            "1048",
            "1050",
            "1052",
        )
    )
    + ("http://pcisig.com/pci/1b36/0100",),
}


class ProfileError(InputError):
    """A profile that cannot be used; the message starts with file:line."""


def global_variables() -> dict[str, tuple[str, ...]]:
    """Every solver variable a profile may name, with the values it can take."""
    _, hyperv = engine_defaults()
    variables: dict[str, tuple[str, ...]] = {
        "domain.type": ("kvm", "qemu"),
        "machine": tuple(f.name for f in families()),
        "firmware": ("bios", "efi", "efi-secure"),
        "clock.offset": ("utc", "localtime", "timezone", "variable"),
        "cpu.mode": ("host-passthrough", "host-model", "maximum", "custom", "none"),
    }
    for feature in hyperv:
        variables[f"hyperv.{feature.feature}"] = ("on", "off")
    for cls in catalog().classes.values():
        for var in cls.variables.values():
            variables[f"{cls.name}.{var.name}"] = var.values
    variables.update(pci_variables())
    return variables


@dataclass(frozen=True)
class Snippet:
    """A domain XML fragment (children of <domain>) with the action that applies it."""

    action: str  # add | default | remove
    multiple: str  # yes | no | auto (add only)
    root: etree._Element  # a <domain> element holding the fragment


@dataclass(frozen=True)
class Rule:
    id: str
    profile: str
    where: str  # file:line
    when: Expression | None = None
    match: Snippet | None = None  # the draft format's <match>: the domain must contain this fragment
    hard: bool = False
    priority: int = 0
    require: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forbid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prefer: dict[str, tuple[str, ...]] = field(default_factory=dict)
    snippets: tuple[Snippet, ...] = ()
    derive: dict[str, Expression] = field(default_factory=dict)
    equal: dict[str, Expression] = field(default_factory=dict)  # variable = value of a fact expression
    drivers: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    version: str
    description: str
    source: str
    digest: str
    rules: tuple[Rule, ...]
    use_when: str = ""


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


def _variable_values(where: str, effect: str, mapping: object, allow_order: bool = False) -> dict[str, tuple[str, ...]]:
    if not isinstance(mapping, dict):
        raise ProfileError(f"{where}: '{effect}' must be a table of variable = [values]")
    known = global_variables()
    result = {}
    for var, values in mapping.items():
        if var not in known:
            close = ", ".join(sorted(k for k in known if k.split(".")[0] == var.split(".")[0])) or ", ".join(
                sorted(known)
            )
            raise ProfileError(f"{where}: unknown variable '{var}' in '{effect}' (known: {close})")
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or not values:
            raise ProfileError(f"{where}: '{effect}.{var}' must be a value or a list of values")
        unknown = [v for v in values if v not in known[var]]
        if unknown:
            raise ProfileError(
                f"{where}: '{effect}.{var}' names unknown value(s) {', '.join(unknown)} "
                f"(accepted: {', '.join(known[var])})"
            )
        result[var] = tuple(values)
    return result


def check_expression(source: str, where: str) -> Expression:
    try:
        expr = parse(source, FUNCTION_NAMES)
    except ExprError as exc:
        raise ProfileError(f"{where}: condition column {exc.column}: {exc}") from None
    known = set(FACT_NAMES) | set(global_variables())
    for name in sorted(expr.names()):
        if name not in known:
            raise ProfileError(
                f"{where}: unknown name '{name}' in condition (facts: {', '.join(sorted(FACT_NAMES))}; "
                "or a solver variable such as machine, firmware, disk.bus)"
            )
    return expr


def parse_snippet(xml: str, where: str, action: str, multiple: str = "auto") -> Snippet:
    try:
        tree = parse_bytes(f"<domain>{xml}</domain>".encode(), where)
    except InputError as exc:
        raise ProfileError(f"{where}: '{action}' snippet: {str(exc).split(': ', 2)[-1]}") from None
    if multiple not in ("yes", "no", "auto"):
        raise ProfileError(f"{where}: multiple = '{multiple}'; accepted: yes, no, auto")
    return Snippet(action, multiple, tree.getroot())


def _rule(raw: object, index: int, profile: str, path: Path, text: str, line: int) -> Rule:
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
            snippets.append(parse_snippet(raw[action], f"{path}:{_line_of_key(text, line, action)}", action, multiple))
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
            derive[xpath] = check_expression(str(source), f"{path}:{_line_of_key(text, line, 'set')}")
    drivers: list[str] = []
    for d in raw.get("drivers", []):
        if d in DRIVER_PACKS:
            drivers.extend(DRIVER_PACKS[d])
        elif isinstance(d, str) and d.startswith("http"):
            drivers.append(d)
        else:
            raise ProfileError(
                f"{where}: drivers: '{d}' is neither an osinfo device id nor a driver pack ({', '.join(DRIVER_PACKS)})"
            )
    effects = {}
    for effect in ("require", "forbid", "prefer"):
        if effect in raw:
            effects[effect] = _variable_values(f"{path}:{_line_of_key(text, line, effect)}", effect, raw[effect])
    equal = {}
    if "equal" in raw:
        if not isinstance(raw["equal"], dict):
            raise ProfileError(f"{where}: 'equal' must be a table of variable = expression")
        known = global_variables()
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


def read_profile_bytes(path: Path) -> bytes:
    """A profile file's bytes, refusing unreadable and oversized files with file:line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path}:1: profile is {len(data)} bytes; the limit is {MAX_PROFILE_BYTES}")
    return data


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
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or len(raw_rules) > MAX_RULES:
        raise ProfileError(f"{path}:1: 'rule' must be a list of at most {MAX_RULES} [[rule]] tables")
    lines = _line_of_rules(text)
    rules = [_rule(r, i, name, path, text, lines[i] if i < len(lines) else 1) for i, r in enumerate(raw_rules)]
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
    )


def load_profile(path: Path) -> Profile:
    if path.suffix == ".xml":
        from virtpolicy.rules.xmlprofile import load_xml_profile

        return load_xml_profile(path)
    return load_toml_profile(path)


def search_path(extra: Iterable[Path] = ()) -> list[Path]:
    """Where profiles are looked up, first match wins: --profile-path, user, system, shipped."""
    import os

    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "virtpolicy" / "profiles"
    return [*extra, config, Path("/etc/virtpolicy/profiles"), SHIPPED]


def available(extra: Iterable[Path] = ()) -> dict[str, Path]:
    """name -> file, over the search path (earlier directories shadow later ones)."""
    found: dict[str, Path] = {}
    for directory in search_path(extra):
        if not directory.is_dir():
            continue
        for file in sorted([*directory.glob("*.toml"), *directory.glob("*.xml")]):
            found.setdefault(file.stem, file)
    return found


def find_profile(name: str, extra: Iterable[Path] = (), version: str | None = None, where: str = "") -> Profile:
    files = available(extra)
    path = Path(name) if name.endswith((".toml", ".xml")) and Path(name).exists() else files.get(name)
    prefix = f"{where}: " if where else ""
    if path is None:
        import difflib

        close = difflib.get_close_matches(name, list(files), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(sorted(files))}"
        raise ProfileError(f"{prefix}unknown profile '{name}'{hint}")
    profile = load_profile(path)
    if version is not None and profile.version != version:
        raise ProfileError(
            f"{prefix}profile '{name}' is pinned to version {version}, but {path} is version {profile.version}"
        )
    return profile
