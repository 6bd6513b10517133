#!/usr/bin/env bash
# Create /work/main/.venv-olah (its own venv: olah's dependencies clash with the project's venv, psutil<6 from
# fastapi-utils among them) and install olah, the Hugging Face Hub mirror server that the Hub round-trip tests serve
# local git repositories with (tests/olah_mirror.py). Idempotent: the stamp is written only after a complete install
# whose server module imports, so a failed or interrupted install is retried on the next run. Silent when already done.
# Usable standalone (bash scripts/olah_venv.sh) or sourced from a `set -euo pipefail` script.
set -euo pipefail
OLAH_VERSION="0.5.4"
# Its dependencies as they were when the tests passed (olah itself only gives lower bounds; its "/" page already fails
# with the starlette pip picks today): a newer release cannot change the server under the tests unnoticed.
OLAH_PINS="
  annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 brotli==1.2.1 certifi==2026.10.19.post1
  charset-normalizer==3.5.3 click==8.5.1 fastapi==0.165.0 fastapi-utils==0.8.0 filelock==4.3.2 fsspec==2026.9.0
  gitdb==4.0.12 GitPython==3.2.1 h11==0.16.0 hf-xet==1.8.0 httpcore==1.0.9 httpcore2==2.17.0 httpx==0.29.0
  httpx2==2.17.0 huggingface_hub==2.4.0 idna==3.21 Jinja2==3.1.6 markdown-it-py==4.3.0 MarkupSafe==3.0.4
  mdurl==0.1.2 mypy_extensions==1.2.0 opentelemetry-api==1.45.3 packaging==26.4 peewee==4.5.3 portalocker==4.4.2
  psutil==5.9.8 pydantic==2.14.4 pydantic-settings==2.16.3 pydantic_core==2.50.5 Pygments==2.21.0
  python-dotenv==1.2.4 python-multipart==0.0.34 pytz==2026.6 PyYAML==6.0.4 requests==2.34.2 rich==15.0.0
  shortuuid==1.0.13 smmap==5.0.3 starlette==1.10.0 tenacity==9.2.1 toml==0.10.2 tqdm==4.70.1 truststore==0.10.5
  typing-inspect==0.9.0 typing-inspection==0.4.5 typing_extensions==4.16.0 urllib3==2.8.0 uvicorn==0.55.0
"
OLAH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLAH_VENV="${OLAH_VENV:-$OLAH_ROOT/.venv-olah}"
OLAH_STAMP="$OLAH_VENV/.installed-olah-$OLAH_VERSION-$(printf %s "$OLAH_PINS" | sha256sum | cut -c1-12)"
if [ ! -f "$OLAH_STAMP" ]; then
  # No stamp: a first run, an interrupted or failed one, or another olah version: start from an empty venv (--clear),
  # so that a half-installed package cannot pass for installed.
  python3 -m venv --clear "$OLAH_VENV" || { echo "olah set-up failed: python3 -m venv $OLAH_VENV" >&2; exit 1; }
  printf '%s\n' $OLAH_PINS > "$OLAH_VENV/olah-pins.txt"
  if ! "$OLAH_VENV/bin/pip" install -q -c "$OLAH_VENV/olah-pins.txt" "olah==$OLAH_VERSION" \
      > "$OLAH_VENV/install.log" 2>&1; then
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
