# Two commands a newcomer needs: `make quickstart` (fresh clone -> trained tiny model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv quickstart test clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(PY) quickstart.py

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) data/pydocs out/quickstart
