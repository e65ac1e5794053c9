#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine: install what is missing, build
# the guest image, report the host, boot a sandbox VM and run a container in it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
KATA=.venv/bin/kata-py
"$KATA" image build >/dev/null
"$KATA" check
echo
echo "== a command in a bare sandbox VM"
"$KATA" vm run -- sh -c 'echo "hello from the sandbox VM: $(uname -sr)"'
echo
echo "== a container (busybox bundle built locally) through the OCI CLI"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python - "$work/bundle" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.bundles import make_bundle
make_bundle(Path(sys.argv[1]), ["sh", "-c", "echo \"container $(hostname): kernel $(uname -r), pid $$\"; id"])
PY
"$KATA" --root "$work/state" run --bundle "$work/bundle" demo
