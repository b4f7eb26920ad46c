"""``lmforge complete`` and ``lmforge chat``: text generation from a shell, streamed as it
comes, over ``lmforge.client.Completion`` and ``ChatCompletion``::

    lmforge complete "The capital of France is" --max-new-tokens 16 --temperature 0
    echo "Once upon a time" | lmforge complete - --json
    lmforge chat --system "You are a pirate." --model ft:smollm2-135m-instruct:pirate:ftjob-abc

``chat`` keeps the conversation (user and assistant messages, after the ``--system`` message)
and sends it whole with each turn, as OpenAI's chat API expects; it reads one line per turn,
from a terminal (``>>>`` prompt, line editing) or from a pipe, until ``/exit`` or end of input.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from lmforge import client
from lmforge.cli.common import (
    api_options,
    base_model,
    describe,
    model_option,
    show,
)
from lmforge.client import ChatCompletion, Completion

CHAT_HELP = """Commands:
  /reset         forget the conversation (the --system message stays)
  /help          show this help
  /exit, /quit   leave (so does end of input, Ctrl-D)"""
DEFAULT_TIMEOUT_S = 120.0  # per read when streaming; a whole reply without (--json)


def _timeout_option(command: Any) -> Any:
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                        default=DEFAULT_TIMEOUT_S, show_default=True, metavar="S",
                        help="Seconds to wait for the server (between pieces when "
                             "streaming).")(command)


@click.command()
@click.argument("prompt")
@model_option
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="0 is greedy.")
@click.option("--stop", multiple=True, metavar="S",
              help="Stop before this string (repeatable).")
@click.option("--seed", type=int, default=None, help="For reproducible sampling.")
@_timeout_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole response as JSON once done, instead of streaming the text.")
@api_options
def complete(prompt: str, model: str | None, max_new_tokens: int, temperature: float,
             stop: tuple[str, ...], seed: int | None, timeout: float, as_json: bool) -> None:
    """Continue PROMPT, streaming the text (PROMPT - reads stdin)."""
    if prompt == "-":
        # the newline that `echo` adds is not part of the prompt
        prompt = sys.stdin.read().removesuffix("\n")
    args: dict[str, Any] = dict(
        model=model or base_model(), prompt=prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, stop_sequences=list(stop) or None, timeout=timeout,
        **({"seed": seed} if seed is not None else {}))
    if as_json:
        show(Completion.create(**args), as_json=True)
        return
    _stream(Completion.create(**args, stream=True))


@click.command()
@model_option
@click.option("--system", default=None, metavar="TEXT", help="A system message to start with.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Per reply.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True,
              help="0 is greedy.")
@click.option("--seed", type=int, default=None,
              help="For reproducible sampling (each turn samples with this seed).")
@_timeout_option
@api_options
def chat(model: str | None, system: str | None, max_new_tokens: int, temperature: float,
         seed: int | None, timeout: float) -> None:
    """Chat with a model, one line per turn; /help lists the commands.

    The replies stream to stdout and the conversation is kept for the next turn. An error
    on one turn is printed and the chat goes on; a server that cannot be reached at the start,
    or an unknown --model, ends it with exit status 1.
    """
    model = model or base_model()
    client.Model.get(model)  # fail now, not on the first turn, for an unknown model
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    sampling: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                    timeout=timeout, **({"seed": seed} if seed is not None else {}))
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"Chatting with {model}; /help lists the commands.", err=True)
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _run_command(text, messages, opening):
                continue
            break
        messages.append({"role": "user", "content": text})
        try:
            reply = _stream(ChatCompletion.create(model, messages, stream=True, **sampling))
        except (client.APIError, KeyboardInterrupt) as e:
            messages.pop()  # the turn did not happen: its question is not history either
            click.echo("Interrupted: the turn is left out of the conversation."
                       if isinstance(e, KeyboardInterrupt) else f"Error: {describe(e)}", err=True)
            continue
        messages.append({"role": "assistant", "content": reply})


def _read_line(interactive: bool) -> str | None:
    """The next line of input, or None at its end (or Ctrl-C at the prompt)."""
    if not interactive:
        return sys.stdin.readline() or None
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    try:
        return input(">>> ")
    except (EOFError, KeyboardInterrupt):
        click.echo(err=True)
        return None


def _run_command(text: str, messages: list[dict[str, str]], opening: list[dict[str, str]]
                 ) -> bool:
    """Run a ``/command``; False means leave the chat."""
    command = text.split()[0].lower()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        messages[:] = opening
        kept = " (the system message stays)" if opening else ""
        click.echo(f"Conversation reset{kept}.")
    elif command == "/help":
        click.echo(CHAT_HELP)
    else:
        click.echo(f"Unknown command {command}; /help lists the commands.", err=True)
    return True


def _stream(pieces: Any) -> str:
    """Echo each piece's text as it arrives, then a newline; return the whole text. On an
    error midway the line is ended before the error propagates."""
    parts: list[str] = []
    try:
        for piece in pieces:
            click.echo(piece.output.text, nl=False)
            parts.append(piece.output.text)
    except BaseException:
        if parts:
            click.echo()
        raise
    click.echo()
    return "".join(parts)

