#!/usr/bin/env bash
# qemu-user for `make test-avx2`: Debian's package (it provides qemu-x86_64), installed when missing, as
# root or with passwordless sudo.
set -euo pipefail
command -v qemu-x86_64 >/dev/null && exit 0
if [[ $(uname -m) != x86_64 ]]; then
  echo "error: make test-avx2 emulates an x86-64 AVX2 CPU with qemu-user on an x86-64 host; this is $(uname -m)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "error: qemu-x86_64 not found and no apt-get here: install qemu-user, then run make test-avx2 again" >&2
  exit 1
fi
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo -n"
echo "make test-avx2: installing qemu-user (Debian)"
$SUDO apt-get install -y -qq qemu-user >/dev/null 2>&1 || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-user >/dev/null; }
command -v qemu-x86_64 >/dev/null
