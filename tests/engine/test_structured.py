"""Structured output in the engine: the bitmask, grammar compilation and errors, and generation
on the tiny random Llama that always matches its JSON schema, regex or choice list (a random
model is the hard case: unconstrained, it emits noise)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from lmforge.engine.request import SamplingParams, StructuredOutput
from lmforge.engine.structured import allocate_token_bitmask, apply_token_bitmask
from lmforge.errors import InvalidRequestError
from tests.engine.test_llm_engine import make_llm

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "kind", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def sample(n=120, **kw):
    return SamplingParams(temperature=1.0, max_tokens=n, **kw)


def test_apply_token_bitmask_matches_the_naive_definition():
    gen = torch.Generator().manual_seed(0)
    vocab = 70  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=gen, dtype=torch.int32)
    out = apply_token_bitmask(logits, bitmask, rows=[2, 0])
    expected = logits.clone()
    for i, row in enumerate([2, 0]):
        for t in range(vocab):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.equal(out[1], logits[1])  # an unconstrained row is untouched
    assert not torch.equal(out, logits)  # and the input was not modified in place
    assert allocate_token_bitmask(2, vocab).shape == (2, 3)


def test_invalid_regex_and_schema_are_400s_naming_the_parameter(llm):
    compiler = llm.engine.structured
    with pytest.raises(InvalidRequestError, match="Invalid regex.*unclosed group") as e:
        compiler.compile(StructuredOutput(regex="(abc", param="regex"))
    assert e.value.param == "regex"
    with pytest.raises(InvalidRequestError, match="Invalid JSON schema") as e:
        compiler.compile(StructuredOutput(json_schema={"type": "integer", "minimum": 5,
                                                       "maximum": 1}))
    assert e.value.param == "response_format"
    with pytest.raises(InvalidRequestError, match="non-empty"):
        StructuredOutput(choice=("a", ""), param="choice")
    # a good grammar compiles once and is then served from the cache
    spec = StructuredOutput(regex="[0-9]+")
    assert compiler.compile(spec) is compiler.compile(StructuredOutput(regex="[0-9]+"))


def test_engine_rejects_a_bad_grammar_before_queueing(llm):
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="Invalid regex"):
        engine.add_request("bad", [1, 2, 3], sample(structured=StructuredOutput(regex="a{2,1}")))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_always_validates(llm, seed):
    params = sample(n=200, seed=seed, structured=StructuredOutput(json_schema=SCHEMA))
    out = llm.generate(["Describe a pet as JSON:"], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert out.text.startswith("{")  # compact: no leading whitespace


def test_regex_and_choice_outputs_match_and_stop(llm):
    regex = r"[a-z]{3}-[0-9]{2,4}"
    outs = llm.generate(["Code: "] * 4, sample(structured=StructuredOutput(regex=regex)),
                        use_tqdm=False)
    for out in outs:
        assert re.fullmatch(regex, out.text), out.text
        assert out.finish_reason == "stop"
    choices = ("positive", "negative", "neutral")
    outs = llm.generate(["Sentiment:"] * 6, sample(structured=StructuredOutput(choice=choices)),
                        use_tqdm=False)
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs)
    assert len({o.text for o in outs}) > 1  # the choice is sampled, not fixed


def test_json_object_mode_stops_at_a_complete_object_and_the_mask_beats_logit_bias(llm):
    # The random model, free, writes endless strings. Both "{}" and " hello" get +100: only
    # "{}" is a JSON object, so the mask must win over the bias, and the request must stop at
    # once because the object is complete.
    empty = llm.tokenizer.encode("{}", add_special_tokens=False)
    hello = llm.tokenizer.encode(" hello", add_special_tokens=False)
    assert len(empty) == len(hello) == 1
    spec = StructuredOutput(json_schema={"type": "object"})
    bias = {empty[0]: 100.0, hello[0]: 100.0}
    outs = llm.generate(["JSON:", "x"], sample(n=50, logit_bias=bias, structured=spec),
                        use_tqdm=False)
    assert [(o.text, o.finish_reason) for o in outs] == [("{}", "stop")] * 2
    free = llm.generate(["JSON:"], sample(n=3, logit_bias=bias), use_tqdm=False)[0]
    assert hello[0] in free.token_ids  # without the grammar, the bias alone decides


def test_constrained_and_free_requests_share_a_batch_without_interference(llm):
    engine = llm.engine
    free = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = llm.generate(["Hello there"], free, use_tqdm=False)[0].token_ids
    engine.add_request("free", engine.tokenizer.encode("Hello there"), free)
    engine.add_request("digits", engine.tokenizer.encode("Number:"),
                       sample(n=10, structured=StructuredOutput(regex="[0-9]{5}")))
    tokens: dict[str, list[int]] = {"free": [], "digits": []}
    texts = {"free": "", "digits": ""}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            texts[out.request_id] += out.text
    assert tokens["free"] == alone
    assert re.fullmatch("[0-9]{5}", texts["digits"])
