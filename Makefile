# The two commands a newcomer needs: `make demo` and `make test`.
# Both install what is missing first (ci/setup.sh), then build the guest image
# if it is not cached, so they work on a fresh Debian 12 machine as root.
VENV := .venv
KATA := $(VENV)/bin/kata-py
PYTEST := $(VENV)/bin/python -m pytest

.PHONY: setup image demo test unit bench check clean

setup:
	@bash ci/setup.sh

image: setup
	@$(KATA) image build

demo: image
	$(KATA) check
	$(KATA) vm run -- sh -c 'echo "hello from the sandbox VM: $$(uname -sr), pid $$$$"; cat /proc/cpuinfo | grep -m1 "model name"'

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: image
	@$(PYTEST) -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$status

unit: setup
	$(PYTEST) -q tests/unit

check: image
	$(KATA) check

bench: image
	$(VENV)/bin/python bench/boot.py
	$(VENV)/bin/python bench/stdio.py

clean:
	rm -rf $(VENV)
