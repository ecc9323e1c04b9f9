#!/usr/bin/env bash
# Bring a fresh Debian 12 machine (as root) to the state virtpolicy needs.
#
#   scripts/setup.sh main   osinfo-db + .venv with `pip install -e .`
#   scripts/setup.sh test   + libvirt/QEMU/OVMF/swtpm/virt-install + `pip install -e '.[test]'`
#                           + the aarch64, ppc64(le), s390x and riscv64 emulators and their firmware
#                           + libvirt's test-suite corpus in .cache/ (scripts/fetch-libvirt-corpus.sh)
#
# CI starts from a bare image, so nothing here may assume a hand-installed package.  Re-runs must be
# cheap (developers run it before every test session): apt is skipped when dpkg-query says every
# package is installed, and pip is skipped while pyproject.toml is unchanged since the last install.
# stdout stays clean for callers; progress goes to stderr.
set -euo pipefail

MODE="${1:-}"
case "$MODE" in
  main | test) ;;
  *)
    echo "usage: $0 main|test" >&2
    exit 2
    ;;
esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup.sh[$MODE]: $*" >&2; }

# Debian's own python3 (not whatever python3 a developer has on PATH): the venv must be
# reproducible on a fresh machine, which only has Debian's.
PY=/usr/bin/python3
PACKAGES=(osinfo-db libvirt0 python3 python3-venv)  # libvirt0: /usr/share/libvirt/schemas (input and output validation)
if [[ "$MODE" == test ]]; then
  PACKAGES+=(
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-utils osinfo-db ovmf swtpm swtpm-tools virtinst hyperfine chromium fonts-dejavu-core
    xz-utils debian-archive-keyring
    # the other architectures' emulators under TCG (tests/test_conformance_arches.py): aarch64 (qemu-system-arm,
    # AAVMF from qemu-efi-aarch64), ppc64/ppc64le (qemu-system-ppc; SLOF is in qemu-system-data), s390x and riscv64
    # (qemu-system-misc; riscv64 boots OpenSBI, and opensbi/u-boot-qemu give it explicit firmware too).
    # Debian 12 has no qemu-efi-riscv64 (no UEFI for riscv64 there).
    qemu-system-arm qemu-system-ppc qemu-system-misc qemu-efi-aarch64 opensbi u-boot-qemu
  )
fi

missing_packages() {
  local p status
  for p in "$@"; do
    status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || echo "$p"
  done
}

mapfile -t MISSING < <(missing_packages "${PACKAGES[@]}")
if ((${#MISSING[@]})); then
  log "apt: installing ${MISSING[*]}"
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${MISSING[@]}" >&2
else
  log "apt: all ${#PACKAGES[@]} packages already installed"
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  log "creating $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi

# The stamp ties the editable install to the dependency list and the mode that installed it.
EXTRA=""
[[ "$MODE" == test ]] && EXTRA="[test,distributed,server]"  # the tests run Dask on a LocalCluster and the REST service
STAMP="$VENV/.virtpolicy-setup-$MODE"
WANT="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -m pip show -q virtpolicy 2>/dev/null; then
  log "pip: virtpolicy$EXTRA already installed for this pyproject.toml"
else
  log "pip: install -e .$EXTRA"
  "$VENV/bin/python" -m pip install -q -e "$REPO$EXTRA" >&2
  echo "$WANT" >"$STAMP"
fi

# libvirt's own test-suite domains (tests/corpus.py): fetched from Debian's source package into .cache/,
# checksum-verified, never committed; a no-op when already present.
if [[ "$MODE" == test ]]; then
  bash "$REPO/scripts/fetch-libvirt-corpus.sh"
fi

log "done"
