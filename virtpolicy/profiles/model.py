"""What a profile is, whatever its file format: rules with effects on the solver's variables and snippets.

Both readers (tomlprofile, xmlprofile) build these objects and check them with the same functions, so a
variable, a value, a condition or a snippet means one thing in either format. The vocabulary a profile
may name is knowledge.vocabulary's; the trust model is explained in profiles.library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError, ProfileError
from virtpolicy.inputs.xmlsafe import parse_bytes, read_file
from virtpolicy.knowledge.vocabulary import profile_vocabulary
from virtpolicy.profiles import snippets as snippet_rules
from virtpolicy.profiles.expr import ExprError, Expression, parse
from virtpolicy.profiles.facts import FACT_NAMES, FUNCTION_NAMES

MAX_PROFILE_BYTES = 256 * 1024
TRUSTED_ORIGINS = "the shipped library, /etc/virtpolicy/profiles, --profile-path DIR or --profile FILE"


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


def variable_values(where: str, effect: str, mapping: object) -> dict[str, tuple[str, ...]]:
    if not isinstance(mapping, dict):
        raise ProfileError(f"{where}: '{effect}' must be a table of variable = [values]")
    known = profile_vocabulary()
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
    known = set(FACT_NAMES) | set(profile_vocabulary())
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
