# Conveniences around the two commands in README.md (ci/demo.sh, ci/test.sh),
# which need nothing but bash on a fresh Debian 12 machine.
VENV := .venv
KATA := $(VENV)/bin/kata-py

.PHONY: setup image demo test unit bench check

setup:
	@bash ci/setup.sh

image: setup
	@$(KATA) image build

demo:
	@bash ci/demo.sh

test:
	@bash ci/test.sh

unit: setup
	$(VENV)/bin/python -m pytest -q tests/unit

check: image
	$(KATA) check

bench: image
	@bash bench/run.sh
