"""Seed 000, SGLang's "OpenAI APIs - Completions" notebook: its 13 code cells, run in order in one
namespace as a notebook kernel runs them, against ``lmforge serve`` on the default model.

Swapped, and nothing else: the model name (``meta-llama/Meta-Llama-3.1-8B-Instruct`` ->
``smollm2-135m-instruct``) and the port (30000 -> a free one). ``sglang.utils`` is the notebook's
helper module; here it is a small stand-in whose ``execute_shell_command`` runs
``lmforge serve`` for the ``sglang.launch_server`` command it is given (same model, same port).

A 135M model is not Llama 3.1 8B: where an answer's content depends on the model, the test
checks the shape and ``finish_reason`` (each cell's checks say which).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
import types

import httpx
import jsonschema
import pytest
from documents import notebook_cells, seed_text
from lmforge_process import MODEL, SERVE_ARGS, LmforgeServe, free_port

THEIR_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
CELLS = notebook_cells(seed_text("000"))
NAMES = ["launch", "chat", "chat-detailed", "chat-stream", "completion", "completion-detailed",
         "json-schema", "regex", "batch-create", "batch-wait", "batch-status", "batch-cancel",
         "terminate"]


class Kernel:
    """One namespace for all cells; each run's printed output is kept."""

    def __init__(self, port: int, home):
        self.port, self.home = port, home
        self.namespace: dict = {"__name__": "__main__"}
        self.printed: dict[str, str] = {}
        self.servers: list[LmforgeServe] = []

    def source(self, index: int) -> str:
        return CELLS[index].replace(THEIR_MODEL, MODEL).replace("30000", str(self.port))

    def run(self, index: int) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(self.source(index), f"seed-000-cell-{index}", "exec"), self.namespace)
        self.printed[NAMES[index]] = out.getvalue()
        sys.stdout.write(out.getvalue())
        return out.getvalue()

    def sglang_utils(self) -> types.ModuleType:
        """The stand-in for ``sglang.utils`` (see the module docstring)."""
        module = types.ModuleType("sglang.utils")

        def execute_shell_command(command: str) -> LmforgeServe:
            args = shlex.split(command)
            assert args[:3] == ["python", "-m", "sglang.launch_server"], command
            options = dict(zip(args[3::2], args[4::2]))
            server = LmforgeServe(["--model", options["--model-path"], "--port",
                                   options["--port"], "--host", "127.0.0.1", *SERVE_ARGS],
                                  self.home)
            self.servers.append(server)
            return server

        def wait_for_server(base_url: str) -> None:
            self.servers[-1].wait(base_url)

        module.execute_shell_command = execute_shell_command
        module.wait_for_server = wait_for_server
        module.terminate_process = lambda server: server.terminate()
        module.print_highlight = print
        return module


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebook")
    kernel = Kernel(free_port(), tmp_path_factory.mktemp("lmforge_home"))
    package = types.ModuleType("sglang")
    package.utils = kernel.sglang_utils()
    saved = {name: sys.modules.get(name) for name in ("sglang", "sglang.utils")}
    sys.modules.update({"sglang": package, "sglang.utils": package.utils})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # the batch cells write batch_requests.jsonl here
        yield kernel
    for server in kernel.servers:
        server.terminate()
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def test_the_notebook_has_its_13_cells():
    assert len(CELLS) == len(NAMES)
    assert all(THEIR_MODEL in c for c in CELLS[1:12] if "model=" in c or '"model"' in c)


def test_launch(kernel):
    kernel.run(0)
    assert httpx.get(f"http://127.0.0.1:{kernel.port}/v1/models").json()["data"][0]["id"] == MODEL


def test_chat(kernel):
    kernel.run(1)
    response = kernel.namespace["response"]
    assert response.model == MODEL and response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")  # max_tokens=64


def test_chat_detailed_is_reproducible_with_its_seed(kernel):
    """seed=42, "Keep for reproducibility": the same request again, now with its prompt in the
    prefix cache, must give the same text."""
    first = kernel.run(2)
    again = kernel.run(2)
    assert first.strip() and first == again


def test_chat_stream(kernel):
    printed = kernel.run(3)
    assert printed.strip()  # the streamed deltas, printed as they came


def test_completion(kernel):
    kernel.run(4)
    response = kernel.namespace["response"]
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage.completion_tokens <= 64


def test_completion_detailed(kernel):
    kernel.run(5)
    choice = kernel.namespace["response"].choices[0]
    # stop=["\n\n", "THE END"]: neither is in the text; the story may also reach max_tokens
    assert "\n\n" not in choice.text and "THE END" not in choice.text
    assert choice.finish_reason in ("stop", "length")


def test_json_schema(kernel):
    """Content depends on the model: the reply must match the schema when complete; cut by
    max_tokens=128 it is a prefix of a match (finish_reason "length")."""
    kernel.run(6)
    choice = kernel.namespace["response"].choices[0]
    schema = json.loads(kernel.namespace["json_schema"])
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), schema)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_regex(kernel):
    kernel.run(7)
    assert kernel.namespace["response"].choices[0].message.content in ("Paris", "London")


def test_batch_create(kernel):
    printed = kernel.run(8)
    assert re.search(r"Batch job created with ID: batch_\w+", printed)


def test_batch_wait(kernel):
    printed = kernel.run(9)
    assert "Batch job completed successfully!" in printed
    results = kernel.namespace["results"]
    assert [r["custom_id"] for r in results] == ["request-1", "request-2"]
    assert all(r["response"]["status_code"] == 200 for r in results)


def test_batch_status(kernel):
    """The 100-line batch is checked while it runs: validated at once, so its total is known."""
    printed = kernel.run(10)
    details = kernel.namespace["batch_details"]
    assert details.status in ("in_progress", "finalizing", "completed")
    assert details.request_counts.total == 100
    assert printed.count("Batch job details (check") == 5


def test_batch_cancel(kernel):
    """The cell asserts "cancelling" then "cancelled" itself; the batch waited behind the
    100-line one, so the cancel ends it without running a line."""
    printed = kernel.run(11)
    assert "Batch job successfully cancelled" in printed
    assert "Successfully cleaned up input file" in printed


def test_terminate(kernel):
    kernel.run(12)
    assert kernel.servers[-1].proc.poll() is not None
