"""docs/GUARANTEES.md cites a test for every promise: each cited test module and test exists."""

from __future__ import annotations

import fnmatch
import re

from tests.services import REPO

GUARANTEES = REPO / "docs" / "GUARANTEES.md"


def defined_tests() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / "tests").rglob("test_*.py"):
        names = set(re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE))
        found[path.relative_to(REPO).as_posix()] = names
    return found


def test_every_cited_test_module_and_test_exists():
    text = GUARANTEES.read_text()
    tests = defined_tests()
    everywhere = set().union(*tests.values())
    cited_modules = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    assert cited_modules, "GUARANTEES.md cites no test module"
    missing_modules = sorted(cited_modules - set(tests))
    assert missing_modules == []
    missing = []
    for module, name in re.findall(r"`(tests/[\w/]+\.py)::(test_[\w*]+)`", text):
        if not fnmatch.filter(tests[module], name):
            missing.append(f"{module}::{name}")
    for name in re.findall(r"`(test_[\w*]+)`", text):
        if not fnmatch.filter(everywhere, name):
            missing.append(name)
    assert missing == []
