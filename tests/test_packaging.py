"""What a user installs: the sdist and the wheel as built, their metadata, and the lint gates."""

from __future__ import annotations

import configparser
import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import dedup_celery
from tests.services import REPO
from tests.test_docs import build_docs

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the sdist and the wheel once, as a release would; return (sdist, wheel, output).

    From a copy of the tree without build leftovers: setuptools reads an existing
    ``*.egg-info/SOURCES.txt`` back into the sdist, which would hide a file the
    configuration leaves out.
    """
    source = tmp_path_factory.mktemp("source") / "dedup_celery"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".tox", "build", "dist", "artifacts", "*.egg-info", "__pycache__"
        ),
    )
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel, output


def test_the_build_gives_no_warning(built):
    _, _, output = built
    warnings = [line for line in output.splitlines() if re.search(r"warning|!!", line, re.I)]
    assert warnings == []


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_the_package_data(built):
    _, wheel, _ = built
    names = _wheel_names(wheel)
    package = REPO / "dedup_celery"
    wanted = {
        "dedup_celery/py.typed",
        *(
            path.relative_to(REPO).as_posix()
            for pattern in (
                "migrations/0*.py",
                "backends/redis/lua/*.lua",
                "templates/**/*.html",
                "static/dedup_celery/*.css",
                "locale/*/LC_MESSAGES/django.[mp]o",
            )
            for path in package.glob(pattern)
        ),
    }
    assert len(wanted) > 10
    assert wanted - names == set()
    # What the code loads, named apart from the tree, so a file deleted from it shows too.
    from dedup_celery.backends.redis.scripts import SCRIPT_NAMES

    lua = {n for n in names if n.startswith("dedup_celery/backends/redis/lua/")}
    assert lua == {f"dedup_celery/backends/redis/lua/{name}.lua" for name in SCRIPT_NAMES}
    templates = "dedup_celery/templates/admin/dedup_celery/deduprecord/"
    for page in ("action", "release", "forget"):
        assert f"{templates}{page}_confirmation.html" in names
    for page in ("change_list", "overview", "overview_row"):
        assert f"{templates}{page}.html" in names
    assert "dedup_celery/static/dedup_celery/admin.css" in names
    assert "dedup_celery/locale/en/LC_MESSAGES/django.mo" in names
    assert not [name for name in names if name.startswith(("tests/", "harness/", "benchmarks/"))]


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def _tox_versions() -> tuple[set[str], set[str]]:
    """The Python and Django versions tox.ini's env_list runs, as "3.11" and "5.2"."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO / "tox.ini")
    envs = config["tox"]["env_list"]
    pythons, djangos = set(), set()
    for group in re.findall(r"py\{?([\d,]+)\}?", envs):
        pythons |= {f"{v[0]}.{v[1:]}" for v in group.split(",")}
    for group in re.findall(r"django\{?([\d,]+)\}?", envs):
        djangos |= {f"{v[0]}.{v[1:]}" for v in group.split(",")}
    return pythons, djangos


def test_the_metadata_names_license_urls_and_every_tested_version(built):
    _, wheel, _ = built
    meta = _metadata(wheel)
    assert meta["Version"] == dedup_celery.__version__
    assert meta["License-Expression"] == "BSD-3-Clause"
    classifiers = meta.get_all("Classifier")
    assert not [c for c in classifiers if c.startswith("License ::")]
    urls = {value.split(",", 1)[0] for value in meta.get_all("Project-URL")}
    assert {"Source", "Documentation", "Changelog", "Issues"} <= urls
    pythons, djangos = _tox_versions()
    assert pythons == {"3.10", "3.11", "3.12", "3.13"}
    for version in pythons:
        assert f"Programming Language :: Python :: {version}" in classifiers
    for version in djangos:
        assert f"Framework :: Django :: {version}" in classifiers
    # Contributors' tools are a dependency group, not an extra users could ask for.
    assert "dev" not in (meta.get_all("Provides-Extra") or [])


def test_the_version_lives_in_one_place():
    assert re.fullmatch(r"\d+\.\d+\.\d+", dedup_celery.__version__)
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: dedup_celery.__version__"
    hits = [
        path.relative_to(REPO).as_posix()
        for path in (
            REPO / "setup.cfg",
            REPO / "pyproject.toml",
            *REPO.glob("dedup_celery/**/*.py"),
        )
        if re.search(rf"['\"]{re.escape(dedup_celery.__version__)}['\"]", path.read_text("utf-8"))
    ]
    assert hits == ["dedup_celery/__init__.py"]


def test_the_sdist_holds_the_documents_and_no_tests(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    documents = {"README.md", "CHANGELOG.md", "LICENSE", "dedup_celery/py.typed"}
    documents |= {
        path.relative_to(REPO).as_posix()
        for pattern in ("*.md", "*.svg", "conf.py")
        for path in (REPO / "docs").glob(pattern)
    }
    assert documents - names == set()
    # The suite needs throwaway servers and the repository's harness: it is not shipped.
    assert not [n for n in names if n.startswith(("tests/", "harness/", "benchmarks/"))]
    assert not [n for n in names if n.startswith("docs/_build/")]


def test_the_docs_build_from_the_sdist_alone(built, tmp_path):
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    run = build_docs(root / "docs", tmp_path / "html")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "html" / "troubleshooting.html").is_file()


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff", "ruff-format", "mypy-strict"],
)
def test_lint_passes(command):
    run = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_readme_links_work_on_pypi():
    # README.md is the long description: PyPI shows it away from the repository, so a
    # relative link there leads nowhere.
    targets = re.findall(r"\]\(([^)\s]+)", (REPO / "README.md").read_text("utf-8"))
    assert targets
    assert [t for t in targets if not t.startswith(("https://", "http://", "#"))] == []


def test_the_package_imports_with_the_oldest_celery_and_django_it_declares(tmp_path):
    # CI's own environment has the newest Celery: this catches what only an older one refuses
    # at import (a Celery class subscripted at run time, say).
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(REPO / "setup.cfg")
    requires = setup["options"]["install_requires"]
    celery_floor = re.search(r"celery>=([\d.]+)", requires).group(1)
    django_floor = re.search(r"Django>=([\d.]+)", requires).group(1)
    venv = tmp_path / "oldest"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"celery=={celery_floor}.*", f"Django=={django_floor}.*"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import django; "
        "from django.conf import settings; "
        "settings.configure(INSTALLED_APPS=['django.contrib.admin', 'django.contrib.auth', "
        "'django.contrib.contenttypes', 'dedup_celery'], "
        "DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}}); "
        "django.setup(); import celery; "
        "import dedup_celery.task, dedup_celery.admin, dedup_celery.checks, dedup_celery.worker; "
        "print(celery.__version__)"
    )
    run = subprocess.run(
        [str(python), "-c", script, str(REPO)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().startswith(celery_floor)
