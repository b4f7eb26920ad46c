#!/usr/bin/env bash
# The README's serve command: set up (instant when already done), then serve the default model
# on 127.0.0.1:8000. Extra arguments go to `lmforge serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/lmforge serve "$@"
