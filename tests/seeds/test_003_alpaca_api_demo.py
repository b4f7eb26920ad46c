"""Seed 003, the Chinese-LLaMA-Alpaca OpenAI API demo: its five curl requests, run as the
document writes them against ``lmforge serve`` (only ``localhost:19327`` becomes our address).

The bodies carry no ``model`` (one model is served: it answers), chat turns say ``message``
where OpenAI says ``content`` (accepted as an alias), and one completion asks for beam
sampling (``num_beams`` with ``temperature`` and ``top_k``, as Hugging Face's ``generate``).
Each answer is checked against the fields the document's own "json return body" shows. One
difference stays, on purpose: the demo's chat reply lists the conversation's turns as
``choices``; ours is OpenAI's (one assistant message per choice), which every OpenAI client
reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
from documents import CurlRequest, curl_requests, json_examples, seed_text

DEMO_ADDRESS = "localhost:19327"
REQUESTS = curl_requests(seed_text("003"))
EXAMPLES = [e for e in json_examples(seed_text("003")) if isinstance(e, dict)]


def test_the_document_has_five_requests_and_their_answers():
    assert [r.url.rsplit("/v1", 1)[1] for r in REQUESTS] == [
        "/completions", "/completions", "/chat/completions", "/chat/completions", "/embeddings"]
    assert [e["object"] for e in EXAMPLES] == ["text_completion", "text_completion",
                                               "chat.completion", "chat.completion", "list"]


def run(request: CurlRequest, base_url: str) -> dict:
    """The answer to the document's command with only the address swapped: the real curl when
    it is installed, else the same URL, headers and body bytes through httpx."""
    address = base_url.removeprefix("http://")
    if shutil.which("curl"):
        done = subprocess.run(["bash", "-c", request.command.replace(DEMO_ADDRESS, address)
                               + " --silent --show-error --write-out '\\n%{http_code}'"],
                              capture_output=True, text=True, timeout=600, check=True)
        body, _, status = done.stdout.rpartition("\n")
    else:
        response = httpx.post(request.url.replace(DEMO_ADDRESS, address),
                              headers=request.headers, content=request.body, timeout=600)
        body, status = response.text, str(response.status_code)
    assert status == "200", body
    return json.loads(body)


def same_fields(ours: dict, theirs: dict, skip: tuple[str, ...] = ()) -> None:
    """Every field of the document's answer is in ours, with a value of the same JSON type."""
    for key, value in theirs.items():
        if key in skip:
            continue
        assert key in ours, f"{key} missing from {ours}"
        assert type(ours[key]) is type(value) or key == "model", (key, ours[key], value)


@pytest.mark.parametrize("index", [0, 1], ids=["plain", "beam-sampling"])
def test_completions(lmforge_url, index):
    answer = run(REQUESTS[index], lmforge_url)
    same_fields(answer, EXAMPLES[index], skip=("choices",))
    assert answer["model"] == "smollm2-135m-instruct"  # no model sent: the one served
    choice = answer["choices"][0]
    same_fields(choice, EXAMPLES[index]["choices"][0])
    assert choice["text"].strip() and choice["finish_reason"] in ("stop", "length")
    if index == 1:  # max_tokens 90 bounds the beam-sampled answer
        assert answer["usage"]["completion_tokens"] <= 90


# Without max_tokens a chat may generate up to the context (640 tokens: about a minute on 2 idle
# cores); a busy machine takes several times that, past pytest-timeout's default 300 s.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("index", [2, 3], ids=["one-turn", "multi-turn"])
def test_chat_with_message_turns(lmforge_url, index):
    request = REQUESTS[index]
    turns = json.loads(request.body)["messages"]
    answer = run(request, lmforge_url)
    same_fields(answer, EXAMPLES[index], skip=("choices",))
    [choice] = answer["choices"]  # OpenAI's shape; the demo listed the turns (module doc)
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    # every turn reached the prompt: the multi-turn prompt is longer by the two later turns
    assert answer["usage"]["prompt_tokens"] > 10 * (len(turns) > 1)


def test_embeddings(lmforge_url):
    answer = run(REQUESTS[4], lmforge_url)
    same_fields(answer, EXAMPLES[4], skip=("data",))
    [item] = answer["data"]
    same_fields(item, EXAMPLES[4]["data"][0], skip=("embedding",))
    # "The length of the embedding vector is the same as the hidden size of the model used."
    assert len(item["embedding"]) == 576  # SmolLM2-135M's hidden size
    assert abs(sum(x * x for x in item["embedding"]) - 1.0) < 1e-3
