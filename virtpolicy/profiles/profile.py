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

Where profiles come from, and what they may write (the trust model):

- A domain's metadata selects profiles by NAME only (`check_name`), looked up on the search path; a
  domain is often written by someone other than the operator, so it never names a file, and nothing
  outside the search path (not the current directory either) is read or even tested for existence.
  A path is accepted from the command line alone (`--profile FILE`, `find_profile(allow_path=True)`).
- Hypervisor pass-through in `add`/`default` snippets (`<qemu:commandline>` and the other driver
  namespaces, see rules.snippets) bypasses everything libvirt and this engine check, so it needs both
  an opt-in in the profile itself (`allow_passthrough = true`, refused at load time without it) and a
  trusted origin, checked when the profile is selected: the shipped library, /etc/virtpolicy/profiles,
  a `--profile-path DIR` or a `--profile FILE` the operator named, in a file and directory that no other
  user can write. The per-user directory ($XDG_CONFIG_HOME) is searched but not trusted for pass-through.
  The draft's XML format has no opt-in, so its snippets can never carry pass-through.
- No snippet can write the engine's own `<virtpolicy:policy>` record.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError, ProfileError
from virtpolicy.inputs.xmlsafe import parse_bytes, read_file
from virtpolicy.knowledge.catalog import catalog
from virtpolicy.knowledge.machines import families
from virtpolicy.knowledge.pci import pci_variables
from virtpolicy.knowledge.tables import engine_defaults
from virtpolicy.profiles import snippets as snippet_rules
from virtpolicy.profiles.expr import ExprError, Expression, parse
from virtpolicy.profiles.facts import FACT_NAMES, FUNCTION_NAMES

MAX_PROFILE_BYTES = 256 * 1024
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
SHIPPED = Path(__file__).parent / "library"
SYSTEM = Path("/etc/virtpolicy/profiles")
# a profile name as a domain may write it: what a file stem on the search path can be, never a path
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NAME_ACCEPTED = "a letter or digit, then letters, digits, '.', '_', '+', '-' (no '/', '\\', '..', leading '.' or '~')"
MAX_NAME = 255  # NAME_MAX: a longer name is no file name on the path
TRUSTED_ORIGINS = "the shipped library, /etc/virtpolicy/profiles, --profile-path DIR or --profile FILE"

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
    allow_passthrough: bool = False  # the profile's own opt-in (`allow_passthrough = true`)
    # the pass-through its snippets write, as "file:line: rule 'id' adds <qemu:commandline> (URI)"; only an
    # opted-in profile has any, and find_profile refuses them unless the file's origin is trusted
    passthrough: tuple[str, ...] = ()


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


def check_snippet(snippet: Snippet, where: str, rule_id: str, allow_passthrough: bool) -> list[str]:
    """Refuse what no profile may write; return the pass-through an opted-in profile writes.

    Only `add` and `default` write to the output: `remove` (and the draft's `match`) of a pass-through
    element is harmless, so it is allowed.
    """
    if snippet.action not in ("add", "default"):
        return []
    forged = snippet_rules.forged_record(snippet.root)
    if forged:
        raise ProfileError(
            f"{where}: rule '{rule_id}': '{snippet.action}' snippet writes {forged}, the engine's own record of "
            "a solve; a profile cannot write it (accepted: any other metadata in the profile's own namespace)"
        )
    parts = snippet_rules.passthrough_parts(snippet.root)
    if parts and not allow_passthrough:
        raise ProfileError(
            f"{where}: rule '{rule_id}': '{snippet.action}' snippet adds {parts[0]}, hypervisor pass-through "
            "that neither libvirt nor virtpolicy checks; accepted only from a profile that says "
            f"allow_passthrough = true and comes from a trusted place ({TRUSTED_ORIGINS})"
        )
    return [f"{where}: rule '{rule_id}' adds {part}" for part in parts]


def parse_snippet(xml: str, where: str, action: str, multiple: str = "auto") -> Snippet:
    try:
        tree = parse_bytes(f"<domain>{xml}</domain>".encode(), where)
    except InputError as exc:
        raise ProfileError(f"{where}: '{action}' snippet: {str(exc).split(': ', 2)[-1]}") from None
    if multiple not in ("yes", "no", "auto"):
        raise ProfileError(f"{where}: multiple = '{multiple}'; accepted: yes, no, auto")
    return Snippet(action, multiple, tree.getroot())


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
    """A profile file's bytes, refusing unreadable and oversized files with file:line.

    Read bounded (xmlsafe.read_file, then this limit): `--profile /dev/zero` must not read forever.
    """
    try:
        data = read_file(path)
    except InputError as exc:
        raise ProfileError(str(exc)) from None
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


def load_profile(path: Path) -> Profile:
    """A profile file (TOML, or the draft's XML by suffix), checked; the caller decides about its origin."""
    if path.suffix == ".xml":
        from virtpolicy.profiles.xmlprofile import load_xml_profile

        profile = load_xml_profile(path)
        for rule in profile.rules:  # the draft format has no opt-in: never pass-through, never the record
            for snippet in rule.snippets:
                check_snippet(snippet, rule.where, rule.id, allow_passthrough=False)
        return profile
    return load_toml_profile(path)


def _user_directory() -> Path | None:
    """$XDG_CONFIG_HOME/virtpolicy/profiles (~/.config without it); None when there is no usable home.

    A relative XDG_CONFIG_HOME is ignored, as the XDG Base Directory spec says: it would make the search
    path depend on the current directory.
    """
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "virtpolicy" / "profiles"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):
        return None
    return home / ".config" / "virtpolicy" / "profiles" if home.is_absolute() else None


def search_path(extra: Iterable[Path] = ()) -> list[Path]:
    """Where profiles are looked up, first match wins: --profile-path, user, system, shipped."""
    user = _user_directory()
    return [*extra, *([user] if user else []), SYSTEM, SHIPPED]


def check_name(name: str, where: str = "") -> str:
    """A profile name as a domain (or `--profile NAME`) may give it, or a one-line InputError.

    Names are looked up on the search path only. A path, a parent reference, a hidden file, a home
    directory or a control character is refused before anything touches the file system, so the answer
    says nothing about which files exist.
    """
    if len(name) <= MAX_NAME and NAME_PATTERN.fullmatch(name) and ".." not in name:
        return name
    shown = name[:64].encode("unicode_escape").decode("ascii").replace("'", "\\'")
    shown += "..." if len(name) > 64 else ""
    prefix = f"{where}: " if where else ""
    raise ProfileError(
        f"{prefix}profile name '{shown}' is refused: a domain selects a profile by name on the profile search "
        f"path, never by file; accepted: {NAME_ACCEPTED}, at most {MAX_NAME} characters (a file is accepted from "
        "the command line only: --profile FILE)"
    )


def looks_like_path(spec: str) -> bool:
    """`--profile` takes a file when it says so: a '/' (or the OS separator) or a .toml / .xml suffix."""
    return "/" in spec or os.sep in spec or spec.endswith((".toml", ".xml"))


def untrusted_because(path: Path, trusted_origin: bool) -> str:
    """'' when a profile file may write hypervisor pass-through, else why not (a phrase about the file).

    The origin must be one the operator chose (`trusted_origin`), and like sshd's StrictModes, a file or
    directory another user could have written (world-writable, or owned by another user than root or the
    one running virtpolicy) is not trusted whatever its origin: that is how a profile gets planted.
    """
    if not trusted_origin:
        return "is in the per-user profile directory, which is searched but not trusted for pass-through"
    try:
        real = path.resolve(strict=True)
        checks = ((real, real.stat()), (real.parent, real.parent.stat()))
    except (OSError, RuntimeError):
        return "cannot be checked"
    for what, st in checks:
        label = "its directory" if what == real.parent else "the file"
        if st.st_mode & stat.S_IWOTH:
            return f"is not trusted: {label} is writable by every user"
        if st.st_uid not in (0, os.geteuid()):
            return f"is not trusted: {label} belongs to another user (uid {st.st_uid})"
    return ""


def available(extra: Iterable[Path] = ()) -> dict[str, Path]:
    """name -> file, over the search path (earlier directories shadow later ones)."""
    found: dict[str, Path] = {}
    for directory in search_path(extra):
        try:
            if not directory.is_dir():
                continue
            files = sorted([*directory.glob("*.toml"), *directory.glob("*.xml")])
        except OSError:
            continue  # an unreadable directory on the path holds no profiles for us
        for file in files:
            found.setdefault(file.stem, file)
    return found


def find_profile(
    name: str, extra: Iterable[Path] = (), version: str | None = None, where: str = "", allow_path: bool = False
) -> Profile:
    """The profile a selection names, looked up on the search path (`extra` = --profile-path first).

    `allow_path` is for the command line alone (`--profile FILE`): a domain's metadata only ever gives a
    name (see check_name), so its selection cannot read a file elsewhere or learn whether one exists.
    """
    extra = list(extra)
    prefix = f"{where}: " if where else ""
    if allow_path and looks_like_path(name):
        path: Path | None = Path(name)
        trusted_origin = True  # the operator named this file
    else:
        check_name(name, where)
        files = available(extra)
        path = files.get(name)
        if path is None:
            import difflib

            close = difflib.get_close_matches(name, list(files), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            names = ", ".join(sorted(files)) or "none"
            raise ProfileError(f"{prefix}unknown profile '{name}'{hint} (available on the search path: {names})")
        trusted_origin = path.parent in {*extra, SYSTEM, SHIPPED}
    profile = load_profile(path)
    if profile.passthrough:
        why = untrusted_because(path, trusted_origin)
        if why:
            raise ProfileError(
                f"{profile.passthrough[0]}, hypervisor pass-through, but {path} {why}; pass-through is accepted only "
                f"from {TRUSTED_ORIGINS}, in a file and directory no other user can write"
                + (f" (selected by {where})" if where else "")
            )
    if version is not None and profile.version != version:
        raise ProfileError(
            f"{prefix}profile '{name}' is pinned to version {version}, but {path} is version {profile.version}"
        )
    return profile
