#!/usr/bin/env bash
# Install everything kata-py needs on a Debian 12 host, idempotently:
# Debian packages that are missing, then a virtual environment with the
# project and its pinned Python dependencies. Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  qemu-system-x86       # the VMM
  python3 python3-venv  # host runtime (Debian 12: Python 3.11)
  lz4                   # guest initramfs compression
  gcc make flex bison bc libelf-dev libc6-dev  # the guest kernel, built once from linux-source-6.1
  busybox-static        # test bundles (a rootfs built locally; no registry)
  golang-github-opencontainers-specs-dev  # the official OCI runtime-spec JSON schemas
  golang-github-containerd-containerd-dev # containerd's .proto files (the shim v2's messages)
  golang-github-containerd-cgroups-dev    # cgroup metrics .proto (the shim's Stats)
  golang-github-gogo-protobuf-dev golang-github-gogo-googleapis-dev  # what those protos import
  podman conmon containerd                # the engines the end-to-end tests drive kata-py with
  containernetworking-plugins             # podman's network backend (bridge, host-local, portmap)
  iptables                                # the NAT rules of podman's bridge network and -p
  runc crun runsc                         # peers for side-by-side benchmarks (runsc: gVisor)
  openssh-server                          # sshd for the remote harness tests (started by them, in a private netns)
  docker.io                               # Docker drives kata-py through containerd's runc shim
  ca-certificates
  chromium                                # headless: the harness report test opens its HTML page as a browser does
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No service starts while packages install (docker.io, containerd): a dockerd
  # started on the host would put its bridge and NAT rules in the host's network.
  # The tests start their own, each inside a private network namespace.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT     # ours: gone however the install ends
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The guest image builder downloads .debs with apt-get: it needs package lists.
if ! apt-cache policy linux-image-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  apt-get update -qq
fi

VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "setup: creating $VENV with the pinned Python dependencies"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# `kata-py` and the shim on PATH for engines' configs (contrib/): links to this
# checkout's venv (containerd finds io.containerd.kata-py.v2 as
# containerd-shim-kata-py-v2 on its PATH).
for tool in kata-py containerd-shim-kata-py-v2; do
  if [ ! -e "/usr/local/bin/$tool" ] || [ -L "/usr/local/bin/$tool" ]; then
    ln -sfn "$PWD/$VENV/bin/$tool" "/usr/local/bin/$tool"
  fi
done
# containerd's messages for the shim, compiled once from Debian's .proto files (cached).
"$VENV/bin/python" -m kata_py.shim.protos >/dev/null
