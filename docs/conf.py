"""Sphinx configuration of the dedup_celery documentation (``make docs``).

The pages are Markdown (MyST). The build runs with warnings as errors, in
``make docs`` and in the test suite (``tests/test_docs.py``), so a broken
reference or a page missing from the table of contents fails CI.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import django  # noqa: E402
from django.conf import settings  # noqa: E402

# autodoc imports the models and signals: a minimal project, no server needed.
if not settings.configured:
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.admin",
            "dedup_celery",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
    )
django.setup()

import dedup_celery  # noqa: E402

project = "dedup_celery"
author = "The dedup_celery authors"
copyright = "2026, the dedup_celery authors"
release = dedup_celery.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Headings become link targets: [text](page.md#a-heading) is checked at build time.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}

html_theme = "furo"
html_title = f"dedup_celery {release}"
html_static_path: list[str] = []
