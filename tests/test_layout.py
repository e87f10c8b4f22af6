"""The package's structure keeps its promises: one field list, one vocabulary, package data."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from dedup_celery.backends.base import (
    CLAIMANT_FIELDS,
    RECORD_FIELDS,
    BaseBackend,
    TransactionalBackend,
)
from dedup_celery.backends.db import DatabaseBackend, sql
from dedup_celery.backends.redis.scripts import SCRIPT_NAMES, script_source
from dedup_celery.checks import check_backend, check_settings
from dedup_celery.models import DedupRecord
from dedup_celery.states import Status
from tests.helpers import ELSEWHERE, make_claim
from tests.services import REPO

LUA = REPO / "dedup_celery" / "backends" / "redis" / "lua"


def test_the_model_columns_are_the_record_fields_in_order():
    columns = tuple(f.name for f in DedupRecord._meta.concrete_fields if not f.primary_key)
    assert columns == RECORD_FIELDS


def test_the_claimant_fields_follow_scope_key_and_key_digest_in_the_record():
    # first_claim_record splices the claimant's values into Record by position: all but
    # the last, payload_digest, which the record keeps right after result.
    assert RECORD_FIELDS[:13] == ("scope", "key", "key_digest", *CLAIMANT_FIELDS[1:-1])
    assert CLAIMANT_FIELDS[0] == "key"
    assert CLAIMANT_FIELDS[-1] == "payload_digest"
    assert RECORD_FIELDS[RECORD_FIELDS.index("result") + 1] == "payload_digest"
    # DatabaseBackend._claim_params builds the claim's parameters in this order.
    claim_parameters = sql.CLAIM_PARAMETERS
    assert claim_parameters == ("scope", "key", "key_digest", *CLAIMANT_FIELDS[1:])


def test_every_lua_script_is_loaded_and_none_types_a_status_name():
    assert sorted(SCRIPT_NAMES) == sorted(path.stem for path in LUA.glob("*.lua"))
    for path in LUA.glob("*.lua"):
        code = re.sub(r"--[^\n]*", "", path.read_text())  # comments may name them
        for status in Status:
            typed = re.search(rf"(['\"]){status.value}\1|\[\[{status.value}\]\]", code)
            assert typed is None, f"{path.name} types {status.value!r}"
    # The names reach Lua through the prelude, from states.py.
    assert "local PROCESSING, CONSUMED, FAILED, POISONED, QUEUED = 'processing'" in script_source(
        "claim"
    )


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("claim", (make_claim(),)),
        ("complete", (make_claim(), None)),
        ("release", ("s", "d", uuid.uuid4().hex)),
        ("fail", (make_claim(),)),
        ("renew", (make_claim(),)),
        ("expire_lease", ("s", "d", uuid.uuid4().hex)),
        ("expire_lease_of_process", ("s", "d", "t", ELSEWHERE)),
        ("get", ("s", "d")),
        ("purge_expired", ()),
    ],
)
def test_a_base_method_left_out_names_the_class_and_the_method(method, args):
    class HalfBackend(BaseBackend):
        pass

    kwargs = {"expired_only": True} if method == "release" else {}
    with pytest.raises(NotImplementedError, match=rf"HalfBackend does not implement {method}\(\)"):
        getattr(HalfBackend(), method)(*args, **kwargs)


def test_a_transactional_backend_must_provide_its_block():
    class HalfTransactional(TransactionalBackend):
        pass

    with pytest.raises(NotImplementedError, match=r"does not implement transactional_claim\(\)"):
        HalfTransactional().transactional_claim(make_claim())


def test_a_backend_without_a_database_does_not_accept_one(settings):
    settings.DEDUP_CELERY = {
        "BACKEND": "redis",
        "OPTIONS": {"url": "redis://127.0.0.1:1/0"},
        "DATABASE": "sqlite",
    }
    (message,) = check_settings()
    assert message.id == "dedup_celery.E004"
    assert "does not keep its records in a database" in message.msg


@pytest.fixture
def unsupported_alias(extra_database):
    """A database alias whose vendor the database backend does not support."""
    return extra_database("elsewhere_db", ENGINE="django.db.backends.dummy")


def test_an_unsupported_database_is_a_check_error_before_any_task_runs(unsupported_alias, settings):
    assert [m.id for m in DatabaseBackend(database=unsupported_alias).check()] == [
        "dedup_celery.E010"
    ]
    settings.DEDUP_CELERY = {"DATABASE": unsupported_alias}
    (message,) = check_backend()
    assert message.id == "dedup_celery.E010"
    assert "'unknown'" in message.msg
    assert message.hint


def test_the_wheel_carries_the_scripts_templates_and_migrations(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = tmp_path.glob("dedup_celery-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in LUA.glob("*.lua"):
        assert f"dedup_celery/backends/redis/lua/{path.name}" in names
    assert (
        "dedup_celery/templates/admin/dedup_celery/deduprecord/release_confirmation.html" in names
    )
    assert "dedup_celery/migrations/0001_initial.py" in names
    assert not [n for n in names if re.match(r"(tests|benchmarks|example_project)/", n)]
    assert any(Path(n).name == "LICENSE" for n in names)
