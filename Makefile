# Two commands set everything up on a fresh machine:
#   make demo   the example project on embedded defaults (SQLite, a file-based broker)
#   make test   the whole test suite (docs build included), on throwaway servers
# Both create .venv and install what they need; 'make test' also installs
# Debian's redis-server, mariadb-server (with libmariadb-dev, for the driver),
# chromium and chromium-driver when they are missing, then mysqlclient.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# mysqlclient has no Linux wheel: it builds once the Debian packages are there.
MYSQL_STAMP := $(VENV)/.mysqlclient-stamp

.PHONY: test demo soak lint docs messages tox constraints packages clean bench bench-overhead

# pip 25.1 is the first to read dependency groups (pyproject.toml's "dev").
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip>=25.1"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt -e . --group dev
	touch $(STAMP)

packages:
	@sh .ci/install-packages

$(MYSQL_STAMP): $(STAMP) constraints.txt | packages
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt mysqlclient
	touch $(MYSQL_STAMP)

test: $(STAMP) packages $(MYSQL_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python example_project/demo/run.py

# The load test with 50 000 messages instead of 5 000 (not run by CI).
soak: $(STAMP) packages $(MYSQL_STAMP)
	DEDUP_LOAD_MESSAGES=50000 $(BIN)/python -m pytest tests/worker/test_load.py $(PYTEST_ARGS)

# The documentation, as Read the Docs builds it; warnings are errors (tests/test_docs.py
# runs the same build in 'make test').
docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# The admin's message catalogue: extract the marked strings, fill the English
# translations (msgen: each is its msgid), then compile the .mo
# (tests/operator/test_locale.py fails when either is stale).
messages: $(STAMP)
	cd dedup_celery && PYTHONPATH=.. ../$(BIN)/python -m django makemessages -l en \
		--no-location --no-obsolete --settings=tests.settings
	msgen --no-wrap -o dedup_celery/locale/en/LC_MESSAGES/django.po \
		dedup_celery/locale/en/LC_MESSAGES/django.po
	cd dedup_celery && PYTHONPATH=.. ../$(BIN)/python -m django compilemessages -l en \
		--settings=tests.settings

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The Django/Python/Celery matrix of tox.ini. pyenv's interpreters are callable
# only once pyenv selects them; put each installed version's own bin folder on
# PATH for this run instead, so tox finds python3.10 ... python3.13 as they are.
tox: $(STAMP) packages $(MYSQL_STAMP)
	PATH="$$(for v in $$(pyenv versions --bare 2>/dev/null | sort -rV); do \
		printf '%s:' "$$(pyenv root)/versions/$$v/bin"; done)$$PATH" $(BIN)/tox $(TOX_ARGS)

constraints: $(STAMP)
	{ echo "# Exact versions that CI ('make test') installs; refresh with 'make constraints'."; \
	  $(BIN)/pip freeze --exclude-editable | grep -iv '^dedup'; } > constraints.txt

clean:
	rm -rf $(VENV) .tox build *.egg-info artifacts example_project/var docs/_build

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP) benchmarks/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

# Every benchmark in one run (about half an hour; not part of CI). See docs/BENCHMARKS.md.
bench: $(STAMP) packages $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# DedupTask's own Python per delivery, with the store stubbed out (no server needed).
bench-overhead: $(STAMP)
	$(BIN)/python benchmarks/overhead.py $(BENCH_ARGS)
