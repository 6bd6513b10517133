#!/usr/bin/env bash
# Create /work/main/.venv-olah (its own venv: olah pins dependencies the project's venv cannot share, psutil 5.x
# among them) and install olah, the Hugging Face Hub mirror server the Hub round-trip tests serve local git
# repositories with (tests/olah_mirror.py). Idempotent: the stamp is written only after a complete install whose
# server module imports, so a failed or interrupted install is retried on the next run. Silent when already done.
# Usable standalone (bash scripts/olah_venv.sh) or sourced from a `set -euo pipefail` script.
set -euo pipefail
OLAH_VERSION="0.5.4"
OLAH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLAH_VENV="${OLAH_VENV:-$OLAH_ROOT/.venv-olah}"
OLAH_STAMP="$OLAH_VENV/.installed-olah-$OLAH_VERSION"
if [ ! -f "$OLAH_STAMP" ]; then
  if [ ! -x "$OLAH_VENV/bin/python" ]; then
    python3 -m venv "$OLAH_VENV" || { echo "olah set-up failed: python3 -m venv $OLAH_VENV" >&2; exit 1; }
  fi
  if ! "$OLAH_VENV/bin/pip" install -q "olah==$OLAH_VERSION" > "$OLAH_VENV/install.log" 2>&1; then
    grep -v "^WARNING: Location" "$OLAH_VENV/install.log" >&2 || true
    echo "olah set-up failed: pip could not install olah==$OLAH_VERSION into $OLAH_VENV (log above, and in" \
         "$OLAH_VENV/install.log)." >&2
    exit 1
  fi
  if ! "$OLAH_VENV/bin/python" -c "import olah.server, git" > "$OLAH_VENV/import.log" 2>&1 \
      || [ ! -x "$OLAH_VENV/bin/olah-cli" ]; then
    cat "$OLAH_VENV/import.log" >&2
    echo "olah set-up failed: olah==$OLAH_VERSION installed into $OLAH_VENV but does not import (or has no" \
         "olah-cli)." >&2
    exit 1
  fi
  touch "$OLAH_STAMP"
fi
