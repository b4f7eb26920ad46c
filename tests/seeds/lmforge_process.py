"""A real ``lmforge serve`` subprocess on the default model (SmolLM2-135M-Instruct), with its own
``LMFORGE_HOME``, as a user starts it: what the seed tests run against."""

from __future__ import annotations

from support.serve_process import LmforgeServe, free_port  # noqa: F401 (re-exported)

MODEL = "smollm2-135m-instruct"  # the model name every seed's own name is swapped for
# Server options (not request changes): requests without max_tokens (the Alpaca demo's chat,
# the notebook's streamed chat) may generate up to the context, OpenAI's default; 640 tokens
# keeps that near half a minute on 2 CPU cores (three such requests run in the suite), and
# still fits the notebook's 500-token batch lines (with their ~40-token prompts).
SERVE_ARGS = ["--max-model-len", "640"]
