"""Errors a user can act on, as one stable hierarchy.

Every failure caused by input names that input, so the CLI can print one line and exit 1 instead of a
traceback, the REST service can answer 400 with a `location`, and a Python caller can catch one class.
Infeasible requirements are not errors: they are results (`Result.feasible` is False).

    VirtpolicyError
    ├── InputError            bad input: .input (file, '<stdin>', '--os'), .location (XPath or line)
    │   ├── ProfileError      a profile that cannot be used (file:line)
    │   ├── HostError         unreadable or inconsistent host data
    │   ├── UnknownOSError    an OS id osinfo-db does not know
    │   └── ArgumentError     an API argument of the wrong type or value
    └── OutputRejected        the engine would have produced XML libvirt's schema rejects (a bug)
"""

from __future__ import annotations

import re

# "file:12: /domain/devices/disk[1]/@x: what" or "file: /domain/...: what" or "file: what"
_PREFIX = re.compile(r"^(?P<input>[^\s:][^:]*?)(?::(?P<line>\d+))?: (?:(?P<xpath>/[^\s]*?):? )?")


class VirtpolicyError(Exception):
    """Base of every error virtpolicy raises on purpose."""


class InputError(VirtpolicyError):
    """Bad input: malformed or hostile XML, unknown OS, unreadable host data, wrong root element.

    The message already names the input (file:line, XPath, OS id) and says what would be accepted;
    `input`, `line` and `location` carry the same facts for programs (the REST service's problem details).
    They are taken from the message's "input:line: /xpath: ..." prefix unless given.
    """

    def __init__(
        self, message: str, *, input: str | None = None, line: int | None = None, location: str | None = None
    ) -> None:
        super().__init__(message)
        match = _PREFIX.match(message)
        parsed_input = match.group("input") if match else None
        parsed_line = int(match.group("line")) if match and match.group("line") else None
        parsed_xpath = match.group("xpath") if match else None
        self.input: str | None = input if input is not None else parsed_input
        self.line: int | None = line if line is not None else parsed_line
        self.location: str | None = location if location is not None else parsed_xpath
        if self.location is None and self.line is not None:
            self.location = f"line {self.line}"

    @property
    def message(self) -> str:
        return str(self)


class ProfileError(InputError):
    """A profile that cannot be used; the message starts with file:line."""


class HostError(InputError):
    """Host data that cannot be read or does not describe a usable host (bundle directory, domcapabilities)."""


class UnknownOSError(InputError):
    """A guest OS id or URI that the osinfo database does not list."""


class ArgumentError(InputError):
    """A value passed to the public API that has the wrong type or is out of range (named in the message)."""


class OutputRejected(VirtpolicyError):
    """virtpolicy produced a domain libvirt's schema rejects: a bug of the engine, never printed as XML.

    Not an InputError: the input was accepted, the engine broke its promise. The CLI reports it in one
    line and exits 1.
    """
