# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
POCKETSD := $(VENV)/bin/pocketsd
PROMPT ?= a yellow triangle at the top, blue background

.PHONY: install demo test clean bench bench-env-optimum train-tiny

# torch is pinned exactly and installed first: an unpinned torch pulls gigabytes of CUDA wheels. --no-compile: pip
# would byte-compile every module of every package (torch's alone are thousands) when Python compiles the ones a run
# imports on first import anyway. `make install` in a fresh clone, both beside the same running export: 40 s, not 83.
PIP := -m pip install -q --no-compile --disable-pip-version-check
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) $(PIP) torch==2.13.0
	$(PY) $(PIP) -e '.[export,bench,dev,openvino]'
	touch $@

install: $(VENV)/.installed

# optimum's own environment for `pocketsd bench` (bench/optimum_worker.py), apart from .venv: optimum-onnx 0.1.0 wants
# transformers<4.58, hence huggingface-hub<1.0, hence diffusers<=0.39. torch is pinned and installed first, as above.
OPTIMUM_VENV := .venv-optimum
$(OPTIMUM_VENV)/.installed:
	python3 -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python $(PIP) torch==2.13.0
	$(OPTIMUM_VENV)/bin/python $(PIP) 'optimum-onnx[onnxruntime]==0.1.0' \
		optimum==2.1.0 onnxruntime==1.32.0 diffusers==0.39.0 transformers==4.57.6 huggingface-hub==0.36.2
	touch $@

bench-env-optimum: $(OPTIMUM_VENV)/.installed

# The built-in trained `shapes` model (shapes/model/): exported, generated from, and the picture judged against its
# prompt (a wrong verdict is printed, not fatal). PROMPT must be a caption of its data set: a COLOUR SHAPE POSITION,
# BACKGROUND background.
demo: install
	rm -rf demo
	$(POCKETSD) export --model shapes --preset cpu --out demo/shapes-cpu
	$(POCKETSD) inspect demo/shapes-cpu
	$(POCKETSD) generate demo/shapes-cpu --prompt "$(PROMPT)" --steps 20 --seed 1 --out demo/shapes.png
	-$(PY) -m pocketsd.shapes.judge demo/shapes.png --prompt "$(PROMPT)"

# Train the shapes model again (seeded; about 40 min on 2 cores) and replace the committed weights in shapes/model/.
train-tiny: install
	rm -rf shapes/model.new
	$(PY) -m pocketsd.shapes.train --out shapes/model.new
	rm -rf shapes/model
	mv shapes/model.new shapes/model

# Tests run in TEST_WORKERS processes (pytest-xdist), a whole test file per worker so that its module fixtures (a tiny
# export each) are built once (tests/conftest.py groups them): most of an export is single-threaded Python.
TEST_WORKERS ?= 2
test: install
	$(VENV)/bin/ruff check pocketsd export runtime apple bench shapes tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

# pocketsd against its peers on the full SD 1.5 architecture (random weights: speed, memory and size are real),
# 256² and 512²; about an hour on 2 cores, ~20 GB of bundles under results/bench/work. BENCH_MODEL=your/folder to
# use your own model. optimum runs from its own venv (.venv-optimum, made here first: its pins clash with ours).
BENCH_MODEL ?= results/bench/sd15
BENCH_ARGS ?=
bench: install bench-env-optimum
	test -f $(BENCH_MODEL)/model_index.json || $(POCKETSD) random-model $(BENCH_MODEL) --arch sd15
	$(POCKETSD) bench --model $(BENCH_MODEL) --out results/bench $(BENCH_ARGS)

clean:
	rm -rf demo $(VENV) *.egg-info
