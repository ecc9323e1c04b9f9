"""Where profiles come from: the search path, names, and the trust model for pass-through.

What profiles may write (the trust model):

- A domain's metadata selects profiles by NAME only (`check_name`), looked up on the search path; a
  domain is often written by someone other than the operator, so it never names a file, and nothing
  outside the search path (not the current directory either) is read or even tested for existence.
  A path is accepted from the command line alone (`--profile FILE`, `find_profile(allow_path=True)`).
- Hypervisor pass-through in `add`/`default` snippets (`<qemu:commandline>` and the other driver
  namespaces, see profiles.snippets) bypasses everything libvirt and this engine check, so it needs both
  an opt-in in the profile itself (`allow_passthrough = true`, refused at load time without it) and a
  trusted origin, checked when the profile is selected: the shipped library, /etc/virtpolicy/profiles,
  a `--profile-path DIR` or a `--profile FILE` the operator named, in a file and directory that no other
  user can write. The per-user directory ($XDG_CONFIG_HOME) is searched but not trusted for pass-through.
  The draft's XML format has no opt-in, so its snippets can never carry pass-through.
- No snippet can write the engine's own `<virtpolicy:policy>` record.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from virtpolicy.errors import ProfileError
from virtpolicy.profiles.model import TRUSTED_ORIGINS, Profile, check_snippet
from virtpolicy.profiles.tomlprofile import load_toml_profile
from virtpolicy.profiles.xmlprofile import load_xml_profile

SHIPPED = Path(__file__).parent / "library"
SYSTEM = Path("/etc/virtpolicy/profiles")
# a profile name as a domain may write it: what a file stem on the search path can be, never a path
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NAME_ACCEPTED = "a letter or digit, then letters, digits, '.', '_', '+', '-' (no '/', '\\', '..', leading '.' or '~')"
MAX_NAME = 255  # NAME_MAX: a longer name is no file name on the path


def load_profile(path: Path) -> Profile:
    """A profile file (TOML, or the draft's XML by suffix), checked; the caller decides about its origin."""
    if path.suffix == ".xml":
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
