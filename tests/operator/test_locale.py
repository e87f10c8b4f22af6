"""The message catalogue: every marked string is in it, and the shipped .mo is compiled from it."""

from __future__ import annotations

import gettext
import re
import shutil
import subprocess
import sys

from django.utils import translation

from tests.services import REPO

LOCALE = REPO / "dedup_celery" / "locale"
PO = LOCALE / "en" / "LC_MESSAGES" / "django.po"
MO = PO.with_suffix(".mo")


def _msgids(po_text: str) -> set[str]:
    """The msgids of a catalogue (plural forms included), joined across continuation lines."""
    ids = set()
    for block in re.findall(r'^msgid(?:_plural)? ((?:".*"\n)+)', po_text, flags=re.M):
        ids.add("".join(re.findall(r'"(.*)"', block)))
    return ids - {""}


def test_the_catalogue_holds_every_string_the_code_marks(tmp_path):
    # makemessages over a copy of the package, with the flags the catalogue was made with.
    copy = tmp_path / "dedup_celery"
    shutil.copytree(REPO / "dedup_celery", copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(copy / "locale")
    (copy / "locale").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "django", "makemessages", "-l", "en", "--no-location",
         "--no-obsolete", "--settings=tests.settings"],
        cwd=copy, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    extracted = _msgids((copy / "locale" / "en" / "LC_MESSAGES" / "django.po").read_text())
    shipped = _msgids(PO.read_text())
    assert len(extracted) > 80
    assert extracted == shipped, "run 'make messages' and commit the catalogue"
    assert "Message table overview" in shipped  # the admin's own pages are marked
    # English is complete: every entry has its translation (msgen copies the msgid).
    assert re.findall(r'^msgstr(?:\[\d\])? ""\n(?!")', PO.read_text() + "\n", flags=re.M) == []


def test_the_shipped_mo_is_compiled_from_the_catalogue(tmp_path):
    compiled = tmp_path / "django.mo"
    run = subprocess.run(
        ["msgfmt", "--check-format", "-o", str(compiled), str(PO)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert compiled.read_bytes() == MO.read_bytes(), "run 'make messages' and commit the .mo"
    with MO.open("rb") as fh:
        catalogue = gettext.GNUTranslations(fh)
    assert catalogue.info()["content-type"] == "text/plain; charset=UTF-8"


def test_django_finds_the_catalogue_of_the_app():
    with translation.override("en"):
        # An English catalogue returns the source strings: found, and not fuzzy.
        assert translation.gettext("Message table overview") == "Message table overview"
    from django.utils.translation import trans_real

    catalogue = trans_real.translation("en")
    assert "Message table overview" in catalogue._catalog
