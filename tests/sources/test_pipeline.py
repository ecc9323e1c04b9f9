"""sources.build: the phases cover every source, and no source holds or imports another's state."""

from __future__ import annotations

import ast
from pathlib import Path

from virtpolicy.sources import build

SOURCES = Path(build.__file__).parent


def test_every_source_runs_in_some_phase() -> None:
    names = {"app", "structural", "placement", "host", "guest", "profiles", "defaults"}
    assert set(build.DECLARE) | set(build.CONSTRAIN) | set(build.PREFER) == names


def test_sources_import_only_the_context_from_each_other() -> None:
    """A source may import sources.context (and app's reading of the XML); never the builder or another
    source's classes. That is the cycle build <-> compile <-> pci <-> locality that went."""
    allowed = {"virtpolicy.sources.context", "virtpolicy.sources.locality", "virtpolicy.sources.app"}
    for path in sorted(SOURCES.glob("*.py")):
        if path.name in ("build.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("virtpolicy.sources."):
                assert node.module in allowed, f"{path.name} imports {node.module}"
                if node.module == "virtpolicy.sources.app":
                    assert [a.name for a in node.names] == ["hyperv_written"], path.name
