# The two commands of the README: `make run` (a server on http://127.0.0.1:8000 with SQLite and
# the in-memory channel layer) and `make test` (the whole suite, on the defaults and on real
# PostgreSQL + Redis). Both create .venv and install the project into it first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint install cluster chaos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Development only, and explicitly so: DEBUG on, and a key of this checkout (var/dev-secret-key).
run: $(STAMP)
	export DJANGO_DEBUG=1 DJANGO_SECRET_KEY="$$(bash scripts/dev-secret-key)" \
		&& $(BIN)/python manage.py migrate --noinput \
		&& $(BIN)/python manage.py seed_demo \
		&& $(BIN)/python manage.py runserver $(HOST):$(PORT)

test: $(STAMP)
	bash scripts/test

# N daphne processes on PostgreSQL + Redis on this machine (ports 8001..): make cluster N=3
N ?= 2
cluster: $(STAMP)
	bash scripts/cluster $(N)

# The long chaos run of docs/testing.md (2 daphne processes on PostgreSQL + a private redis-server,
# 200 tabs, 5,000 messages, every fault); more: make chaos CHAOS_ARGS="--messages 20000 --seed 9"
CHAOS_ARGS ?=
chaos: $(STAMP)
	bash scripts/services
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres} \
		$(BIN)/python -m chaos --tabs 200 --processes 2 --messages 5000 $(CHAOS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
