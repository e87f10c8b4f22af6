"""The documentation: it builds without a warning, and it keeps up with the package.

The build is the one ``make docs`` runs (Sphinx, warnings as errors). The other
tests read the package itself (its check ids, log lines, exceptions, settings
and task options) and fail when a page leaves one out, so the reference cannot
drift from the code.
"""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dedup_celery import exceptions
from dedup_celery.conf import DEFAULTS
from dedup_celery.task import DedupTask
from tests.services import REPO

DOCS = REPO / "docs"
SITE = "https://dedup-celery.readthedocs.io/en/latest/"


def build_docs(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Run the build of ``make docs``: every warning is an error, and all are reported."""
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(source), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs-html")
    run = build_docs(DOCS, out)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def _page(name: str) -> str:
    return re.sub(r"\s+", " ", (DOCS / name).read_text("utf-8"))


def test_the_docs_build_without_a_warning(site):
    built = {path.stem for path in site.glob("*.html")}
    sources = {path.stem for path in DOCS.glob("*.md")}
    # Every page is reachable from the table of contents (Sphinx warns otherwise), and built.
    assert sources <= built


def test_the_readme_links_into_the_docs_reach_a_page_and_a_heading(site):
    links = re.findall(r"\]\((" + re.escape(SITE) + r"[^)\s]*)\)", (REPO / "README.md").read_text())
    assert len(links) >= 8
    for link in links:
        parts = urlsplit(link)
        page = parts.path.removeprefix(urlsplit(SITE).path) or "index.html"
        built = site / page
        assert built.is_file(), f"{link}: no page {page}"
        if parts.fragment:
            ids = set(re.findall(r'id="([^"]+)"', built.read_text("utf-8")))
            assert parts.fragment in ids, f"{link}: no heading #{parts.fragment} on {page}"


def _check_ids() -> set[str]:
    source = (REPO / "dedup_celery" / "checks.py").read_text("utf-8")
    return set(re.findall(r"dedup_celery\.[EW]\d{3}", source))


def test_every_check_id_is_explained_and_none_is_invented():
    page = _page("troubleshooting.md")
    documented = set(re.findall(r"\| `(dedup_celery\.[EW]\d{3})` \|", page))
    assert documented == _check_ids()


_PLACEHOLDER = re.compile(r"%(?:\.\d+)?[sdrf]")


def _log_formats() -> list[tuple[str, str]]:
    """Every literal format string the package passes to a logger, with where it is."""
    found = []
    for path in sorted((REPO / "dedup_celery").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
            ):
                continue
            args = node.args[1:] if node.func.attr == "log" else node.args
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                found.append((where, args[0].value))
    return found


def test_every_log_line_is_explained():
    page = _page("troubleshooting.md")
    formats = _log_formats()
    assert len(formats) >= 30
    missing = []
    for where, fmt in formats:
        # The page quotes each line with "…" for what varies: every fixed part must be there.
        fixed = [part.strip(" .:;,()[]") for part in _PLACEHOLDER.split(fmt)]
        fixed = [re.sub(r"\s+", " ", part) for part in fixed if len(part.strip(" .:;,()[]")) >= 8]
        missing += [f"{where}: {part!r}" for part in fixed if part not in page]
    assert missing == []


def test_every_exception_is_explained():
    page = _page("troubleshooting.md")
    names = [
        name
        for name, value in vars(exceptions).items()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == exceptions.__name__
    ]
    assert len(names) >= 8
    assert [name for name in names if f"| `{name}` |" not in page] == []


def test_every_setting_and_task_option_has_a_reference_entry():
    page = _page("settings.md")
    assert [key for key in DEFAULTS if f"| `{key}` |" not in page] == []
    options = [name for name in vars(DedupTask) if name.startswith("dedup_")]
    assert len(options) >= 8
    assert [name for name in options if f"| `{name}` |" not in page] == []


def test_the_api_reference_renders_the_public_names(site):
    import dedup_celery

    text = html.unescape((site / "api.html").read_text("utf-8"))
    missing = [
        name
        for name in dedup_celery.__all__
        if f'id="dedup_celery.{name}"' not in text
        and f'id="dedup_celery.exceptions.{name}"' not in text
    ]
    assert missing == []
    for name in ("message_claimed", "duplicate_skipped", "lease_lost", "message_forgotten"):
        assert f'id="dedup_celery.signals.{name}"' in text
    assert 'id="dedup_celery.backends.base.BaseBackend"' in text
