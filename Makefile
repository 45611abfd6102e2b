# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
POCKETSD := $(VENV)/bin/pocketsd
PROMPT ?= a lighthouse on a cliff at sunset, oil painting

.PHONY: install demo test clean

# torch is pinned exactly and installed first: an unpinned torch pulls gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[export,bench,dev,openvino]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf demo
	$(POCKETSD) random-model demo/tiny-model --arch tiny
	$(POCKETSD) export --model demo/tiny-model --preset cpu --out demo/tiny-cpu
	$(POCKETSD) inspect demo/tiny-cpu
	$(POCKETSD) generate demo/tiny-cpu --prompt "$(PROMPT)" --steps 20 --seed 1 --out demo/tiny.png

test: install
	$(VENV)/bin/ruff check pocketsd export runtime apple bench tests
	$(PY) -m pytest -q

clean:
	rm -rf demo $(VENV) *.egg-info
