"""``server/prompts.py``'s bound on prompt length: no token stands for more characters than
``longest_token_chars``, so a text over ``max_model_len`` times that cannot fit the context; and
``encode_request``, which renders a chat (its tools included) or completions request for both
the normal and the beam-search paths."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmforge.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.server.prompts import LOSSY_SLACK, encode_request, longest_token_chars
from lmforge.server.tools import ToolPlan
from lmforge.tokenizer import Tokenizer


def test_smollm2_tokens_never_stand_for_more_than_their_spelling(smollm2_tokenizer):
    vocab = smollm2_tokenizer.hf.get_vocab()
    spelled = {i: token for token, i in vocab.items()}
    ids = sorted(spelled)
    texts = smollm2_tokenizer.hf.batch_decode([[i] for i in ids], skip_special_tokens=False)
    assert all(len(text) <= len(spelled[i]) for i, text in zip(ids, texts))
    assert longest_token_chars(smollm2_tokenizer) == max(map(len, vocab)) == 81  # byte-level


def test_the_bound_holds_for_random_text(smollm2_tokenizer):
    longest = longest_token_chars(smollm2_tokenizer)
    rng = random.Random(0)
    alphabet = "ab #-\n\t.é😀中" + "#" * 20 + " " * 20
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3000)))
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
        assert len(text) <= len(ids) * longest, text[:80]


def _tokenizer(normalizer, pre_tokenizer, byte_fallback: bool = True) -> Tokenizer:
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "abab": 4}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "ab")],
                                    unk_token="<unk>", byte_fallback=byte_fallback))
    rust.normalizer = normalizer
    rust.pre_tokenizer = pre_tokenizer
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust))


def test_a_tokenizer_that_may_shorten_text_gets_the_slack():
    # SentencePiece-like: Prepend / Replace(" " -> "▁") never shorten, bytes fall back
    keeps = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert longest_token_chars(_tokenizer(keeps, pre_tokenizers.Metaspace())) == 5  # "<unk>"
    # NFC composes code points, Replace("ab" -> "") and Whitespace drop text, and without
    # byte fallback a run of unknown characters may fuse into one <unk>
    for tokenizer in [_tokenizer(normalizers.NFC(), None),
                      _tokenizer(normalizers.Replace("ab", ""), None),
                      _tokenizer(None, pre_tokenizers.Whitespace()),
                      _tokenizer(None, None, byte_fallback=False)]:
        assert longest_token_chars(tokenizer) == 5 * LOSSY_SLACK


def test_a_chat_request_renders_its_tools_whoever_makes_the_plan(smollm2_tokenizer):
    engine = SimpleNamespace(tokenizer=smollm2_tokenizer, max_model_len=2048)
    messages = [{"role": "user", "content": "add 1 and 2"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    body = ChatCompletionRequest(model="m", messages=messages, tools=tools)
    plan = ToolPlan.of(body, smollm2_tokenizer.chat_template)
    [ids], echoes = asyncio.run(encode_request(engine, body, plan=plan))  # the normal path
    assert echoes == [""]
    assert asyncio.run(encode_request(engine, body)) == ([ids], [""])  # the beam path
    text = smollm2_tokenizer.decode(ids, skip_special_tokens=False)
    assert "# Tools" in text and '"name": "add"' in text  # SmolLM2's template shows no tools
    none = ChatCompletionRequest(model="m", messages=messages, tools=tools, tool_choice="none")
    [plain], _ = asyncio.run(encode_request(engine, none))
    assert plain == smollm2_tokenizer.apply_chat_template(messages)


def test_a_completions_request_encodes_each_prompt_and_its_echo(smollm2_tokenizer):
    engine = SimpleNamespace(tokenizer=smollm2_tokenizer, max_model_len=2048)
    texts = CompletionRequest(model="m", prompt=["Hello there", "General"], echo=True)
    ids, echoes = asyncio.run(encode_request(engine, texts))
    assert ids == [smollm2_tokenizer.encode("Hello there"), smollm2_tokenizer.encode("General")]
    assert echoes == ["Hello there", "General"]
    token_ids = CompletionRequest(model="m", prompt=[[1, 2], [3]], echo=True)
    decoded = [smollm2_tokenizer.decode(t, skip_special_tokens=False) for t in ([1, 2], [3])]
    assert asyncio.run(encode_request(engine, token_ids)) == ([[1, 2], [3]], decoded)
    quiet = CompletionRequest(model="m", prompt="Hello there")
    assert asyncio.run(encode_request(engine, quiet)) == ([ids[0]], [""])
