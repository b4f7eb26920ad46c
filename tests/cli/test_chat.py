"""``lmforge complete`` and ``lmforge chat`` (click's CliRunner) against the session server on
the tiny Llama: the streamed text, the ``--json`` response and every chat reply equal what
``lmforge.client`` returns for the same arguments (greedy, or seeded), a chat turn sends the
whole conversation (the server's prompt-token counter says so) and ``/reset`` forgets it, a
failed turn is reported and left out, and errors name what to run next."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from lmforge.cli import main
from lmforge.cli.chat import CHAT_HELP
from lmforge.client import ChatCompletion, Completion, configure, settings

PROMPT = "The capital of France is"


@pytest.fixture
def lmforge(base_url, monkeypatch):
    """``lmforge(*args, input=None)`` -> the click Result, aimed at the session server."""
    monkeypatch.setenv("LMFORGE_BASE_URL", base_url)
    for name in ("LMFORGE_API_KEY", "LMFORGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return lambda *args, input=None: CliRunner().invoke(main, [str(a) for a in args],
                                                        input=input, catch_exceptions=False)


@pytest.fixture
def sdk(base_url):
    """``lmforge.client`` configured for the session server during the test."""
    previous = settings()
    configure(base_url=base_url, max_retries=0, timeout=30)
    yield
    configure(previous.base_url, previous.api_key, max_retries=previous.max_retries,
              timeout=previous.timeout)


def test_complete_streams_and_prints_json_as_the_client_returns(lmforge, sdk, model):
    expected = Completion.create(model, PROMPT, max_new_tokens=12, temperature=0)
    assert expected.output.text
    streamed = lmforge("complete", PROMPT, "--max-new-tokens", 12, "--temperature", 0)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == expected.output.text + "\n"  # --model: the server's base model
    as_json = lmforge("complete", PROMPT, "--max-new-tokens", 12, "--temperature", 0,
                      "--model", model, "--json")
    assert json.loads(as_json.stdout)["output"] == expected.output.model_dump(mode="json")
    piped = lmforge("complete", "-", "--max-new-tokens", 12, "--temperature", 0,
                    input=PROMPT + "\n")
    assert piped.stdout == streamed.stdout

    stop = expected.output.text[len(expected.output.text) // 2:][:2]
    stopped = Completion.create(model, PROMPT, max_new_tokens=12, temperature=0.8, seed=7,
                                stop_sequences=[stop]).output.text
    assert len(stopped) < len(expected.output.text) or stop not in stopped
    result = lmforge("complete", PROMPT, "--max-new-tokens", 12, "--temperature", 0.8,
                     "--seed", 7, "--stop", stop)
    assert result.stdout == stopped + "\n"


def chat_reply(model, messages):
    """(reply, prompt tokens) at ``SAMPLING`` (the tiny model's greedy chat replies are only
    newlines, and its seeded replies hardly depend on the prompt: the prompt tokens tell)."""
    output = ChatCompletion.create(model, messages, max_new_tokens=8, temperature=1.0,
                                   seed=5).output
    return output.text, output.num_prompt_tokens


SAMPLING = ["--max-new-tokens", 8, "--temperature", 1.0, "--seed", 5]


def prompt_tokens_total(http) -> int:
    """The server's ``lmforge:prompt_tokens_total``: what it received, summed over requests."""
    [total] = re.findall(r"^lmforge:prompt_tokens_total(?:\{[^}]*\})? (\S+)$",
                         http.get("/metrics").text, flags=re.M)
    return int(float(total))


def test_chat_sends_the_conversation_and_reset_forgets_it(lmforge, sdk, model, http):
    system = [{"role": "system", "content": "Be brief."}]
    first = system + [{"role": "user", "content": "Hello there"}]
    r1, p1 = chat_reply(model, first)
    r2, p2 = chat_reply(model, first + [{"role": "assistant", "content": r1},
                                        {"role": "user", "content": "What did I say?"}])
    fresh, p3 = chat_reply(model, system + [{"role": "user", "content": "What did I say?"}])
    before = prompt_tokens_total(http)
    lines = "Hello there\nWhat did I say?\n/reset\n\nWhat did I say?\n/help\n/exit\nignored\n"
    result = lmforge("chat", "--system", "Be brief.", *SAMPLING, "--model", model, input=lines)
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{r1}\n{r2}\nConversation reset (the system message stays).\n"
                             f"{fresh}\n{CHAT_HELP}\n")
    # the second turn carried the first one (p2), the one after /reset only the system (p3)
    assert p2 > p3 and prompt_tokens_total(http) - before == p1 + p2 + p3


def test_a_failed_turn_is_reported_and_left_out_of_the_conversation(lmforge, sdk, model):
    too_long = "hello " * 600  # over the tiny model's 512-token context
    lines = f"{too_long}\n/nope\nHi\n"  # then end of input
    result = lmforge("chat", *SAMPLING, input=lines)
    assert result.exit_code == 0, result.output
    [error, unknown] = result.stderr.splitlines()
    assert error.startswith("Error: ") and "(HTTP 400)" in error and "context" in error
    assert unknown == "Unknown command /nope; /help lists the commands."
    assert result.stdout == chat_reply(model, [{"role": "user", "content": "Hi"}])[0] + "\n"


def test_errors_say_what_to_run_next(lmforge, monkeypatch):
    unknown = lmforge("chat", "--model", "nope", input="Hi\n")
    assert unknown.exit_code == 1 and unknown.stdout == ""
    assert unknown.stderr == ("Error: The model `nope` does not exist. (HTTP 404). "
                              "See `lmforge models list`.\n")
    monkeypatch.setenv("LMFORGE_MODEL", "nope")
    result = lmforge("complete", PROMPT)
    assert result.exit_code == 1 and "See `lmforge models list`" in result.stderr
    dead = lmforge("chat", "--base-url", "http://127.0.0.1:9", input="Hi\n")
    assert dead.exit_code == 1 and "Start one with `lmforge serve`" in dead.stderr
