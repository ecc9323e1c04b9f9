"""libvirt's own RelaxNG schema for domains, on what comes in and on what goes out.

libvirt refuses a domain its schema rejects (`virsh define --validate`, and many checks in its parser
mirror it), so carrying such input into the engine only turns a clear complaint into a confusing one
later, or worse, into output libvirt refuses. The schema is the Debian `libvirt0` file
`/usr/share/libvirt/schemas/domain.rng`; it is compiled once per process (about 20 ms) and a domain
then validates in well under a millisecond.

Input is partial by design, so it is validated with a documented relaxation (`RELAXED`): the few
things the schema requires that the engine itself fills are made optional, nothing else. Output is
validated against the unmodified schema: virtpolicy never prints a domain libvirt's schema rejects.

Every failure is ONE line: `FILE:LINE: XPATH: libvirt's domain schema rejects this: MESSAGE`.
"""

from __future__ import annotations

import copy
import functools
import threading
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError, OutputRejected

SCHEMA_DIR = Path("/usr/share/libvirt/schemas")
SCHEMA_FILE = SCHEMA_DIR / "domain.rng"
RNG_NS = "http://relaxng.org/ns/structure/1.0"

# What the input may omit because the engine fills it: (define in domaincommon.rng, an XPath inside that
# define with r: for RelaxNG, or "" for the define's whole body) -> why. Each is wrapped in <optional>.
RELAXED: dict[tuple[str, str], str] = {
    ("hvs", ""): "/domain/@type: the engine picks kvm or qemu from the host",
    ("diskTarget", ""): "disk/target: the engine names each disk's target and picks its bus",
    ("diskTarget", ".//r:element[@name='target']/r:attribute[@name='dev']"): (
        "disk/target/@dev: the engine names the target (vda, sda, hda ...)"
    ),
}

# lxml messages that only say "something below failed"; a more specific one is preferred
_GENERIC = (
    "failed to validate content",
    "Invalid sequence in interleave",
    "Expecting an element",
    "Error validating value",
)
_LOCALIZE_BUDGET = 400  # validations spent finding the innermost rejected element (error path only)


@functools.cache
def _strict() -> etree.RelaxNG | None:
    """The unmodified schema, or None when libvirt0 is not installed (validation is then skipped)."""
    if not SCHEMA_FILE.is_file():
        return None
    return etree.RelaxNG(etree.parse(str(SCHEMA_FILE)))


@functools.cache
def _relaxed() -> etree.RelaxNG | None:
    """domain.rng with the `RELAXED` defines made optional.

    Built the way domain.rng is (start -> domainoverrides.rng -> domaincommon.rng), with domaincommon's
    grammar inlined so its defines can be edited in memory; relative includes resolve against the
    schema directory because the edited document keeps its file's URL.
    """
    common_file = SCHEMA_DIR / "domaincommon.rng"
    overrides_file = SCHEMA_DIR / "domainoverrides.rng"
    if not (common_file.is_file() and overrides_file.is_file()):
        return _strict()
    overrides = etree.parse(str(overrides_file))
    common = etree.parse(str(common_file)).getroot()
    defines = {d.get("name"): d for d in common.iterfind(f"{{{RNG_NS}}}define")}
    for (name, pattern), _why in RELAXED.items():
        define = defines.get(name)
        if define is None:
            continue
        body = [c for c in define if isinstance(c.tag, str)]
        targets = [[t] for t in define.xpath(pattern, namespaces={"r": RNG_NS})] if pattern else [body]
        for nodes in targets:
            parent = nodes[0].getparent()
            optional = etree.Element(f"{{{RNG_NS}}}optional")
            parent.insert(parent.index(nodes[0]), optional)
            for node in nodes:
                optional.append(node)
    grammar = overrides.getroot()
    include = grammar.find(f"{{{RNG_NS}}}include[@href='domaincommon.rng']")
    if include is None:
        return _strict()
    position = grammar.index(include)
    grammar.remove(include)
    for offset, child in enumerate(c for c in common if c.tag != f"{{{RNG_NS}}}start"):
        grammar.insert(position + offset, child)
    start = etree.SubElement(grammar, f"{{{RNG_NS}}}start")
    etree.SubElement(start, f"{{{RNG_NS}}}ref", name="domain")
    return etree.RelaxNG(overrides)


# --- remembering accepted devices ------------------------------------------------------------------
# RelaxNG validation is mostly spent on <devices> (libxml2 compiles each typed value's pattern anew: a
# pcie-root-port costs as much as the whole domain without devices), and the same device elements come
# back solve after solve. domain.rng's <devices> is an interleave of optional / zeroOrMore parts, each
# over single element definitions; whether a child matches its part depends on that child's subtree only
# (RelaxNG has no context beyond it), and children of one name fall in one part. So a domain whose
# devices have all been accepted before (each as an exact serialisation) validates exactly when the same
# domain does with its devices swapped for accepted ones of the same names (small "stand-ins"): that
# cheaper document is what libxml2 then checks. Only acceptance is taken from the memo: a refusal is
# always libxml2's verdict on the document itself, and a device only gets into the memo as part of a
# domain the schema accepted as a whole. Checked against full validation on every rendered corpus
# domain and on thousands of mutations of them (benchmarks/check_validation_memo.py).
_MEMO_SIZE = 2048  # distinct accepted device elements kept per schema (a few hundred bytes each)
_MEMO_MIN_DEVICES = 4  # below this the whole domain validates about as fast as its skeleton


def _rng(tag: str) -> str:
    return f"{{{RNG_NS}}}{tag}"


def _pattern_children(el: etree._Element) -> list[etree._Element]:
    """The pattern elements of a RelaxNG node (annotations and comments are not patterns)."""
    return [c for c in el if isinstance(c.tag, str) and c.tag.startswith(f"{{{RNG_NS}}}")]


def _grammar_defines() -> dict[str, list[etree._Element]] | None:
    """Every define of domain.rng and the files it includes, by name (None when one cannot be read).

    Not kept: the parsed files are a few MiB, and only the two shape checks below read them, once.
    """
    defines: dict[str, list[etree._Element]] = {}
    todo, seen = [SCHEMA_FILE], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            doc = etree.parse(str(path))
        except (OSError, etree.XMLSyntaxError):
            return None
        todo += [path.parent / i.get("href", "") for i in doc.iter(_rng("include"))]
        for define in doc.iter(_rng("define")):
            defines.setdefault(define.get("name", ""), []).append(define)
    return defines


def _metadata_takes_anything() -> bool:
    """Whether a skeleton may leave <metadata>'s children out (_metadata_shape)."""
    return _schema_shapes()[1]


def _memo_sound() -> bool:
    """Whether the device memo may answer at all (_devices_shape)."""
    return _schema_shapes()[0]


@functools.cache
def _schema_shapes() -> tuple[bool, bool]:
    """(_devices_shape, _metadata_shape) of the installed schema, from one reading of its files."""
    defines = _grammar_defines()
    if defines is None:
        return False, False
    return _devices_shape(defines), _metadata_shape(defines)


def _metadata_shape(defines: dict[str, list[etree._Element]]) -> bool:
    """Whether <metadata> is libvirt's "any elements, any content" (basictypes.rng metadata and
    customElement): its children then cannot make a domain invalid, and a skeleton leaves them out.

    Read from the schema files, so a libvirt that ever constrains metadata gets it validated in full.
    """
    if len(defines.get("metadata", [])) != 1 or len(defines.get("customElement", [])) != 1:
        return False
    body = _pattern_children(defines["metadata"][0])
    if len(body) != 1 or body[0].tag != _rng("element") or body[0].get("name") != "metadata":
        return False
    content = _pattern_children(body[0])
    if len(content) != 1 or content[0].tag != _rng("zeroOrMore"):
        return False
    inner = _pattern_children(content[0])
    if len(inner) != 1 or inner[0].tag != _rng("ref") or inner[0].get("name") != "customElement":
        return False
    custom = _pattern_children(defines["customElement"][0])
    if len(custom) != 1 or custom[0].tag != _rng("element") or custom[0].get("name") is not None:
        return False
    parts = _pattern_children(custom[0])
    if [p.tag for p in parts] != [_rng("anyName"), _rng("zeroOrMore")] or _pattern_children(parts[0]):
        return False
    choice = _pattern_children(parts[1])
    if len(choice) != 1 or choice[0].tag != _rng("choice"):
        return False
    options = sorted(_pattern_children(choice[0]), key=lambda o: o.tag)
    if [o.tag for o in options] != [_rng("attribute"), _rng("ref"), _rng("text")]:
        return False
    attribute, ref, text = options
    any_name = _pattern_children(attribute)
    return (
        len(any_name) == 1
        and any_name[0].tag == _rng("anyName")
        and not _pattern_children(any_name[0])
        and ref.get("name") == "customElement"
        and not _pattern_children(text)
    )


def _devices_shape(defines: dict[str, list[etree._Element]]) -> bool:
    """Whether the installed domain.rng has the <devices> shape the memo relies on (see above).

    Read from the schema files themselves, so a libvirt whose <devices> grows an ordered group, a
    oneOrMore, or a part that is not a named element simply validates every domain in full.
    """

    def single_elements(node: etree._Element, depth: int = 0) -> bool:
        """A named element, or a choice of them, possibly through refs (each to one define)."""
        if depth > 8:
            return False
        if node.tag == _rng("element"):
            return bool(node.get("name")) and ":" not in node.get("name", "")
        if node.tag == _rng("ref"):
            found = defines.get(node.get("name", ""), [])
            body = _pattern_children(found[0]) if len(found) == 1 else []
            return len(body) == 1 and single_elements(body[0], depth + 1)
        if node.tag == _rng("choice"):
            options = _pattern_children(node)
            return bool(options) and all(single_elements(o, depth + 1) for o in options)
        return False

    found = defines.get("devices", [])
    body = _pattern_children(found[0]) if len(found) == 1 else []
    if len(body) != 1 or body[0].tag != _rng("element") or body[0].get("name") != "devices":
        return False
    content = _pattern_children(body[0])
    if len(content) != 1 or content[0].tag != _rng("interleave"):
        return False
    for part in _pattern_children(content[0]):
        inner = _pattern_children(part)
        if part.tag not in (_rng("optional"), _rng("zeroOrMore")) or len(inner) != 1:
            return False
        if not single_elements(inner[0]):
            return False
    return True


class _DeviceMemo:
    """Device elements one schema accepted under <devices>, by serialisation, and a stand-in per name."""

    def __init__(self) -> None:
        self.accepted: set[bytes] = set()
        self.stand_ins: dict[str, etree._Element] = {}
        self._shrunk: set[str] = set()  # names whose stand-in has been made small (on first use)
        self._lock = threading.Lock()

    def remember(self, devices: list[tuple[etree._Element, bytes]]) -> None:
        """The devices of a domain the schema accepted as a whole (each then matches its part).

        Cheap on purpose (a one-shot CLI run validates once and never uses the memo): the stand-in is a
        plain copy of the first device of each name until a skeleton first needs it.
        """
        with self._lock:
            if len(self.accepted) + len(devices) > _MEMO_SIZE:
                self.accepted = set()
            for element, key in devices:
                self.accepted.add(key)
                if element.tag not in self.stand_ins:
                    stand_in = copy.deepcopy(element)
                    stand_in.tail = None
                    self.stand_ins[element.tag] = stand_in  # type: ignore[index]

    def _stand_in(self, schema: etree.RelaxNG, tag: str) -> etree._Element:
        if tag not in self._shrunk:
            with self._lock:
                if tag not in self._shrunk:
                    self.stand_ins[tag] = _shrunk(schema, self.stand_ins[tag])
                    self._shrunk.add(tag)
        return self.stand_ins[tag]

    def accepts_with_stand_ins(self, schema: etree.RelaxNG, tree: etree._ElementTree, devices: etree._Element) -> bool:
        """The domain validated with its <devices> swapped for one of stand-ins (and its <metadata> for
        an empty one, when the schema takes anything in it), then put back.

        Every part of <devices> is optional or zeroOrMore and an interleave ignores order, so what
        the schema can tell from the devices (once each is known to match its part) is how many there
        are of each name, up to two: the stand-in <devices> has one or two of each name, nothing else.
        Text between devices would be refused, so a domain with any gets validated in full instead.
        """
        counts: dict[str, int] = {}
        if devices.text and not devices.text.isspace():
            return bool(schema.validate(tree))
        for device in devices:
            if device.tail and not device.tail.isspace():
                return bool(schema.validate(tree))
            if isinstance(device.tag, str):  # comments and processing instructions RelaxNG skips
                counts[device.tag] = min(counts.get(device.tag, 0) + 1, 2)
        stand_ins = etree.Element(devices.tag, dict(devices.attrib))
        stand_ins.tail = devices.tail
        for tag, count in counts.items():
            for _ in range(count):
                stand_ins.append(copy.deepcopy(self._stand_in(schema, tag)))
        root = devices.getparent()
        swaps = [(devices, stand_ins)]
        metadata = root.find("metadata")
        if metadata is not None and not root.nsmap and _metadata_takes_anything():
            # its children match whatever they hold; only what metadata itself carries counts. Moved only
            # when the root declares no namespace its content could be using
            texts = [metadata.text, *(c.tail for c in metadata)]
            if all(t is None or t.isspace() for t in texts):
                empty = etree.Element(metadata.tag, dict(metadata.attrib))
                empty.tail = metadata.tail
                swaps.append((metadata, empty))
        done: list[tuple[etree._Element, etree._Element]] = []
        try:
            for real, stand_in in swaps:
                root.replace(real, stand_in)
                done.append((real, stand_in))
            return bool(schema.validate(tree))
        finally:
            for real, stand_in in done:
                root.replace(stand_in, real)


# a minimal domain libvirt's schema accepts, to validate a device on its own in
_STUB = b"<domain type='kvm'><name>device</name><memory>1</memory><os><type>hvm</type></os><devices/></domain>"
_SHRINK_BUDGET = 48  # validations spent once per device name on a cheap stand-in


def _shrunk(schema: etree.RelaxNG, device: etree._Element) -> etree._Element:
    """A copy of an accepted device without the children and attributes the schema lets it do without.

    Each removal is kept only when a minimal domain holding the copy as its only device still validates,
    so the stand-in matches the same part of <devices> (devices of one name share a part); its cost is
    what every later skeleton pays for that device (an <address> alone is most of a device's).
    """
    stub = etree.fromstring(_STUB)
    holder = stub.find("devices")
    candidate = copy.deepcopy(device)
    candidate.tail = None
    holder.append(candidate)
    budget = _SHRINK_BUDGET - 1
    if not schema.validate(stub):
        candidate = copy.deepcopy(device)  # the stub itself is refused (a changed schema): as it is
        candidate.tail = None
        return candidate
    for index in range(len(candidate) - 1, -1, -1):
        if budget <= 0:
            break
        child = candidate[index]
        budget -= 1
        candidate.remove(child)
        if not schema.validate(stub):
            candidate.insert(index, child)
    for name in list(candidate.attrib):
        if budget <= 0:
            break
        budget -= 1
        value = candidate.attrib.pop(name)
        if not schema.validate(stub):
            candidate.set(name, value)
    holder.remove(candidate)
    return candidate


_MEMOS: dict[int, _DeviceMemo] = {}


def _accepts(schema: etree.RelaxNG, tree: etree._ElementTree) -> bool:
    """schema.validate(tree), through the device memo when the domain's devices were all accepted before.

    False always comes from validating `tree` itself, so schema.error_log then describes `tree`. The
    tree's <devices> is swapped out and back while the memo answers: callers pass trees of their own
    request (the rendered output, a domain being parsed), which no other thread reads meanwhile.
    """
    root = tree.getroot()
    devices = root.find("devices") if root.tag == "domain" else None
    if devices is None or len(devices) < _MEMO_MIN_DEVICES:
        return bool(schema.validate(tree))
    keys = [(d, etree.tostring(d, with_tail=False)) for d in devices if isinstance(d.tag, str)]
    if any(b"xmlns" in key for _, key in keys):
        return bool(schema.validate(tree))  # namespaced content: not moved around, validated as it is
    memo = _MEMOS.setdefault(id(schema), _DeviceMemo())
    known = all(key in memo.accepted for _, key in keys)
    # the schema's shape is read (10 ms, once) only when the memo would first answer, not in a one-shot run
    if known and _memo_sound() and memo.accepts_with_stand_ins(schema, tree, devices):
        return True
    if not schema.validate(tree):
        return False
    memo.remember(keys)
    return True


def _as_tree(doc: etree._ElementTree | etree._Element | bytes, source: str) -> etree._ElementTree:
    if isinstance(doc, bytes):
        from virtpolicy.inputs.xmlsafe import parse_bytes

        return parse_bytes(doc, source)
    return doc.getroottree() if isinstance(doc, etree._Element) else doc


def _xpath(el: etree._Element) -> str:
    from virtpolicy.inputs.domain import xpath_of

    return xpath_of(el)


def _best_error(log: etree._ListErrorLog) -> tuple[int, str, str]:
    """(line, path, message) of the most telling entry: deepest path, specific message, first seen."""
    entries = list(log)
    if not entries:
        return 0, "/domain", "the document does not validate"

    def rank(e: etree._LogEntry) -> tuple[int, int, int]:
        specific = not any(g in e.message for g in _GENERIC)
        return (1 if e.path else 0, specific, (e.path or "").count("/"))

    best = max(entries, key=rank)  # max keeps the first of equals: libxml2 logs the innermost cause first
    return best.line or 0, best.path or "/domain", best.message.strip().rstrip(".")


def _innermost(schema: etree.RelaxNG, tree: etree._ElementTree) -> tuple[etree._Element | None, str | None]:
    """The innermost element whose removal makes the document valid (libxml2 often blames a parent), and
    the attribute of it whose removal does.

    Error path only, bounded by _LOCALIZE_BUDGET validations.
    """
    work = copy.deepcopy(tree.getroot())
    budget = _LOCALIZE_BUDGET
    steps: list[int] = []  # child indexes from the root: lxml proxies have no stable identity to map by
    parent = work
    while budget > 0:
        culprit = None
        for index, child in enumerate(parent):
            if not isinstance(child.tag, str):
                continue
            if budget <= 0:
                break
            budget -= 1
            parent.remove(child)
            valid = schema.validate(etree.ElementTree(work))
            parent.insert(index, child)
            if valid:
                culprit = index
                break
        if culprit is None and parent.tag == "devices" and budget > 0:
            # several devices are wrong at once (no single removal helps): the first that fails on its own
            isolated = _isolate_device(schema, work, parent, budget)
            if isolated is not None:
                index, work, budget = isolated
                steps.append(index)
                parent = work.find("devices")[0]
                continue
        if culprit is None:
            break
        steps.append(culprit)
        parent = parent[culprit]
    if not steps:
        return None, None
    found = tree.getroot()
    for index in steps:
        found = found[index]
    attribute = None
    for name in list(parent.attrib):  # parent is the culprit's copy: which of its attributes is refused?
        if budget <= 0:
            break
        budget -= 1
        value = parent.attrib.pop(name)
        valid = schema.validate(etree.ElementTree(work))
        parent.set(name, value)
        if valid:
            attribute = name
            break
    return found, attribute


def _isolate_device(
    schema: etree.RelaxNG, work: etree._Element, devices: etree._Element, budget: int
) -> tuple[int, etree._Element, int] | None:
    """(index, a copy of `work` holding only that device, budget left) for the first device the schema
    rejects on its own, when the document without any device is valid; None otherwise."""
    children = list(devices)
    for child in children:
        devices.remove(child)
    try:
        budget -= 1
        if not schema.validate(etree.ElementTree(work)):
            return None
        for index, child in enumerate(children):
            if budget <= 0 or not isinstance(child.tag, str):
                continue
            budget -= 1
            devices.append(child)
            valid = schema.validate(etree.ElementTree(work))
            devices.remove(child)
            if not valid:
                single = copy.deepcopy(work)
                single.find("devices").append(copy.deepcopy(child))
                return index, single, budget
        return None
    finally:
        for child in children:
            devices.append(child)


def _message(schema: etree.RelaxNG, tree: etree._ElementTree, source: str) -> str:
    line, path, message = _best_error(schema.error_log)
    specific = not any(g in message for g in _GENERIC)
    el, attribute = _innermost(schema, tree)
    if el is not None:
        path, line = _xpath(el), el.sourceline or line
        if attribute is not None:
            path += f"/@{attribute}"
            if not specific:
                message = f"{attribute}='{el.get(attribute)}' is not a value it accepts ({message})"
    return f"{source}:{line}: {path}: libvirt's domain schema rejects this: {message}"


def validate_input(tree: etree._ElementTree | etree._Element, source: str) -> None:
    """Refuse a domain libvirt's schema rejects (with `RELAXED` applied): InputError, one line."""
    schema = _relaxed()
    doc = _as_tree(tree, source)
    if schema is None or _accepts(schema, doc):
        return
    raise InputError(_message(schema, doc, source))


def accepted_strictly(tree: etree._ElementTree | etree._Element) -> bool:
    """Whether libvirt's unmodified schema accepts the domain (True when the schema is not installed)."""
    schema = _strict()
    return schema is None or _accepts(schema, _as_tree(tree, ""))


def validate_complete(tree: etree._ElementTree | etree._Element, source: str, why_complete: str) -> None:
    """A domain taken as complete gets nothing filled in, so it must already be one libvirt accepts:
    InputError naming the rejected element, and the way to have the engine fill it instead."""
    schema = _strict()
    doc = _as_tree(tree, source)
    if schema is None or _accepts(schema, doc):
        return
    raise InputError(
        f"{_message(schema, doc, source)}; the domain counts as complete ({why_complete}), so nothing is "
        "filled in: complete it, or treat it as partial (--partial, complete=False)"
    )


def validate_output(
    doc: etree._ElementTree | etree._Element | bytes, source: str, printed: bytes | None = None
) -> None:
    """Refuse to print a domain the unmodified schema rejects: OutputRejected, one line.

    Given bytes, the printed text itself is parsed, so the line numbers are the output's own. Given the
    rendered tree and the text printed from it (`printed`), the tree is validated as it is: parsing the
    text again costs a fifth of the validation and tells the schema nothing new (the text is that tree,
    serialised; indentation is whitespace the schema skips). Only a rejection parses `printed`, so the
    message still names the printed text's lines, and it is that text's verdict which is reported.
    """
    schema = _strict()
    if schema is None:
        return
    tree = _as_tree(doc, source)
    if _accepts(schema, tree):
        return
    if printed is not None:
        tree = _as_tree(printed, source)
        if schema.validate(tree):
            return
    raise OutputRejected(
        "virtpolicy would have printed a domain libvirt's schema rejects: " + _message(schema, tree, source)
    )


def validate_device(device: etree._Element, source: str) -> None:
    """A device element on its own (`device add`), validated as libvirt would inside a domain.

    The element is checked inside a minimal domain; messages name its own file:line and an XPath from
    the device element (/interface/address/@bus), not from the stand-in domain.
    """
    from virtpolicy.inputs.domain import check_values

    stub = etree.fromstring(_STUB)
    stub.find("devices").append(copy.deepcopy(device))
    try:
        validate_input(stub.getroottree(), source)
        check_values(stub, source)
    except InputError as exc:
        text = str(exc)
        tag = etree.QName(device).localname if isinstance(device.tag, str) else "node()"
        for prefix in (f"/domain/devices/{tag}[1]", "/domain/devices", "/domain"):
            if f": {prefix}" in text:
                text = text.replace(f": {prefix}", f": /{tag}", 1)
                break
        raise InputError(text) from None


def available() -> bool:
    """Whether libvirt's schema is installed (Debian libvirt0); without it validation is skipped."""
    return _strict() is not None


@functools.cache
def schema_arches() -> frozenset[str]:
    """The architectures libvirt's own schema accepts in <os><type arch> (basictypes.rng archnames): an
    architecture outside it is one this libvirt cannot define, whatever a host reports."""
    path = SCHEMA_DIR / "basictypes.rng"
    try:
        tree = etree.parse(str(path))
    except (OSError, etree.XMLSyntaxError):
        return frozenset()  # no schema installed: nothing to check against (validation says so itself)
    found = tree.getroot().find(f"{{{RNG_NS}}}define[@name='archnames']")
    return (
        frozenset(v.text.strip() for v in found.iter(f"{{{RNG_NS}}}value") if v.text)
        if found is not None
        else frozenset()
    )
