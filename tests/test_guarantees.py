"""docs/GUARANTEES.md cites a test for every promise: each cited module, test and parameter exists.

The check reads the suite's own collection (``pytest --collect-only``), so a
wildcard such as ``test_a_*`` must match a test in the modules its row cites,
and a parameter such as ``[transactional]`` must be one that test runs with.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tempfile

from tests.services import REPO

GUARANTEES = REPO / "docs" / "GUARANTEES.md"


def collected() -> list[tuple[str, str, str]]:
    """Every test the suite collects, as (module path, test name, parameter id or "")."""
    # A scratch folder of its own: a pytest session removes its folder when it ends.
    scratch = tempfile.mkdtemp(prefix="dedup-celery-collect-")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DEDUP_TEST_TMP": scratch},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    nodes = []
    for line in done.stdout.splitlines():
        found = re.fullmatch(r"(tests/[\w/]+\.py)::(\w+)(?:\[(.*)\])?", line.strip())
        if found:
            nodes.append((found[1], found[2], found[3] or ""))
    return nodes


def has_param(param_id: str, cited: str) -> bool:
    """True if *cited* is *param_id*, or a run of its dash-separated parts."""
    return f"-{cited}-" in f"-{param_id}-"


def test_every_cited_test_module_test_and_parameter_exists():
    nodes = collected()
    assert nodes, "nothing collected"
    text = GUARANTEES.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    # Outside the tables, every test named anywhere must exist somewhere.
    missing = [
        name
        for name in re.findall(r"`(?:tests/[\w/]+\.py::)?(test_[\w*]+)`", text)
        if not any(fnmatch.fnmatch(n[1], name) for n in nodes)
    ]
    cited_rows = 0
    for row in rows:
        modules = set(re.findall(r"`(tests/[\w/]+\.py)", row))
        names = re.findall(r"`(?:tests/[\w/]+\.py::)?(test_[\w*]+)`", row)
        names += re.findall(r"`tests/[\w/]+\.py::(test_[\w*]+)", row)
        params = re.findall(r"`\[([\w-]+)\]`", row)
        if not (modules or names):
            continue
        cited_rows += 1
        missing += [m for m in modules if not any(n[0] == m for n in nodes)]
        where = [n for n in nodes if not modules or n[0] in modules]
        matched = []
        for name in set(names):
            hits = [n for n in where if fnmatch.fnmatch(n[1], name)]
            if not hits:
                missing.append(f"{name} (in {sorted(modules) or 'any module'})")
            matched += hits
        for param in params:
            if not any(has_param(n[2], param) for n in (matched or where)):
                missing.append(f"[{param}] for {sorted(set(names)) or sorted(modules)}")
    assert cited_rows >= 20, "GUARANTEES.md cites fewer tests than it did"
    assert missing == []
