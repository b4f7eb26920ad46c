"""llguidance vs xgrammar on SmolLM2's tokenizer: the measurement behind ``engine/structured.py``.

For each library: building its view of the 49k vocabulary, compiling a JSON schema / a regex /
"any JSON object", and the time to compute one token mask while walking a valid document token by
token (median, p90, max), for a schema-bound document and a free-text JSON object.

lmforge depends on llguidance only. To rerun the comparison, install xgrammar beside it without
its dependencies (it would pull triton, 286 MB, which a CPU build does not use):

    .venv/bin/pip install --no-deps xgrammar apache-tvm-ffi
    .venv/bin/python benchmarks/grammar_libraries.py

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.models.loader import resolve_model_path
from lmforge.tokenizer import Tokenizer

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"]},
        "kind": {"enum": ["a", "b", "c"]}},
    "required": ["name", "age", "tags", "address", "kind"], "additionalProperties": False,
}
SCHEMA_DOC = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"],
              "address": {"city": "London", "zip": "12345"}, "kind": "b"}
FREE_DOC = {"story": "Once upon a time, in a small village near the mountains, there lived an "
            "old clockmaker who repaired every clock in town. " * 3,
            "list": [1, 2.5, -30000.0, True, None], "nested": {"k": "värde ✓"}}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def walk(fill: Callable[[], None], accept: Callable[[int], bool], ids: list[int]) -> dict:
    """Per-token mask times (us) over a valid token sequence."""
    times = []
    for token in ids:
        ms, _ = timed(fill)
        times.append(ms * 1e3)
        if not accept(token):
            raise RuntimeError(f"token {token} rejected: the document does not match")
    times.sort()
    return {"median_us": statistics.median(times), "p90_us": times[int(0.9 * len(times))],
            "max_us": times[-1]}


def llguidance_numbers(hf: Any, docs: dict[str, list[int]]) -> dict:
    import llguidance
    import llguidance.hf
    import torch

    out: dict[str, Any] = {}
    out["tokenizer_ms"], tok = timed(lambda: llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB))
    grammars = {"schema": llguidance.LLMatcher.grammar_from_json_schema(SCHEMA),
                "free": llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}),
                "regex": llguidance.LLMatcher.grammar_from_regex(r"\d{3}-\d{4}")}
    bitmask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    pointer, size = bitmask.data_ptr(), bitmask.numel() * 4
    for name, grammar in grammars.items():
        out[f"compile_{name}_ms"], matcher = timed(lambda g=grammar: llguidance.LLMatcher(tok, g))
        if name in docs:
            out[f"mask_{name}"] = walk(
                lambda m=matcher: m.unsafe_compute_mask_ptr(pointer, size),
                matcher.consume_token, docs[name])
    return out


def xgrammar_numbers(hf: Any, docs: dict[str, list[int]]) -> dict:
    import xgrammar as xgr

    out: dict[str, Any] = {}
    out["tokenizer_ms"], info = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf,
                                                                               vocab_size=VOCAB))
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    compiled = {}
    out["compile_schema_ms"], compiled["schema"] = timed(
        lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    out["compile_free_ms"], compiled["free"] = timed(compiler.compile_builtin_json_grammar)
    out["compile_regex_ms"], _ = timed(lambda: compiler.compile_regex(r"\d{3}-\d{4}"))
    out["compile_schema_again_ms"], _ = timed(
        lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))  # its own cache
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    for name, grammar in compiled.items():
        matcher = xgr.GrammarMatcher(grammar)
        out[f"mask_{name}"] = walk(lambda m=matcher: m.fill_next_token_bitmask(bitmask, 0),
                                   matcher.accept_token, docs[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "grammar_libraries.json")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_gguf(resolve_model_path("smollm2-135m-instruct")[0])
    docs = {"schema": tokenizer.encode(json.dumps(SCHEMA_DOC), add_special_tokens=False),
            # llguidance refuses \\u escapes of printable characters: send them as UTF-8
            "free": tokenizer.encode(json.dumps(FREE_DOC, ensure_ascii=False),
                                     add_special_tokens=False)}
    results = {"llguidance": llguidance_numbers(tokenizer.hf, docs)}
    try:
        results["xgrammar"] = xgrammar_numbers(tokenizer.hf, docs)
    except ImportError:
        print("xgrammar is not installed; see this script's docstring")
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
