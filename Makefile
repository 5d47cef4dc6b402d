# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean gallery fuzz

# The venv is refreshed whenever the project's dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moesim simulate --out reports/out/demo --report \
		--what-if routing.max_devices=8 --what-if parallel.dispatch_kernel=nccl-alltoall

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_speed.py
	$(PY) bench/bench_sweep.py

# The hostile-input properties with 2,000 cases each (CI runs 40 each).
fuzz: $(STAMP)
	MOESIM_FUZZ_EXAMPLES=2000 $(PY) -m pytest -q -p no:cacheprovider tests/e2e/test_hostile_inputs.py

# The report gallery in reports/examples/, made by the documented commands.
gallery: $(STAMP)
	rm -rf reports/examples
	$(VENV)/bin/moesim simulate --set model.num_layers=8 --set parallel.tokens_per_gpu=1024 \
		--out reports/examples/simulate --report --trace-gpus 4 \
		--what-if routing.max_devices=8 --what-if parallel.dispatch_kernel=nccl-alltoall
	$(VENV)/bin/moesim sweep examples/sweeps/quick.yaml --out reports/examples/sweep-quick --report
	$(VENV)/bin/moesim plan examples/plans/quick.yaml --out reports/examples/plan-quick --report
	$(VENV)/bin/moesim simulate examples/v3-2048-h800-dualpipe.yaml --trace-gpus 4 \
		--out reports/examples/v3-2048-whole-step --report

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) reports/out build *.egg-info
