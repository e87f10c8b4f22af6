"""The example project's own tests pass, run as its authors would run them.

example_project/orders/tests.py is the pytest-django example the docs show for
dedup_celery.testing; this runs it with the example's settings (SQLite, no
server), in a process of its own, so the documented example cannot rot.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.services import REPO


def test_the_example_projects_tests_pass(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["SHOP_VAR_DIR"] = str(tmp_path / "var")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "orders/tests.py", "--ds=shop.settings",
         "-c", os.devnull, "--rootdir", ".", "-p", "no:cacheprovider", "-q"],
        cwd=REPO / "example_project", env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout
