"""Seed 004, Scale's LLM Engine Python client reference, on ``lmforge.client`` (whose interface is
LLM Engine's) against ``lmforge serve``: the documented signatures, the streamed lines' shape,
the 5-row CSV script, ``File.upload(open(path, "r"))``, fine-tuning with the defaults, and the
``Model`` calls. Only the model name and the server's address (``LMFORGE_BASE_URL``, where LLM
Engine reads ``LLM_ENGINE_BASE_PATH``) differ from the document.

What the capture of the document cannot give as written: its CSV script has a typo (the fifth
tuple lacks its opening parenthesis, a SyntaxError) and lost the indentation of its ``with``
block; the test checks both defects are still there, then repairs exactly those.
"""

from __future__ import annotations

import ast
import asyncio
import csv
import time

import pytest
from documents import json_examples, python_block, seed_text, signatures
from lmforge_process import MODEL

from lmforge.client import Completion, File, FineTune, Model
from lmforge.client.errors import APIError

TEXT = seed_text("004")
EXAMPLES = json_examples(TEXT)
STREAM_EXAMPLE = [e for e in EXAMPLES if "request_id" in e]
FINAL = {"SUCCESS", "FAILURE", "CANCELLED"}


@pytest.fixture(autouse=True)
def server(lmforge_url, monkeypatch):
    monkeypatch.setenv("LMFORGE_BASE_URL", lmforge_url)
    return lmforge_url


def documented_defaults(method) -> dict[str, object]:
    """The method's parameters before ``**extra``, as {name: default or ...}."""
    import inspect

    params = inspect.signature(method).parameters.values()
    return {p.name: ... if p.default is p.empty else p.default
            for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}


@pytest.mark.parametrize("name, index, method", [
    ("create", 0, Completion.create), ("acreate", 0, Completion.acreate),
    ("create", 1, FineTune.create)], ids=["Completion.create", "Completion.acreate",
                                          "FineTune.create"])
def test_signatures_are_the_documented_ones(name, index, method):
    documented = signatures(TEXT, name)[index]
    ours = documented_defaults(method)
    assert list(ours) == list(documented)  # same names, same order: positional calls work
    for param, default in documented.items():
        assert ours[param] == (... if default is None else ast.literal_eval(default)), param


def test_completion_create_sync_and_streamed():
    response = Completion.create(model=MODEL, prompt="The capital of France is")
    assert response.request_id and response.output.text
    assert 1 <= response.output.num_completion_tokens <= 20  # max_new_tokens=20 by default
    pieces = list(Completion.create(model=MODEL, prompt="The sky is", max_new_tokens=5,
                                    stream=True))
    for piece, example in zip(pieces, STREAM_EXAMPLE):  # the document's streamed lines' fields
        dumped = piece.model_dump()
        assert set(example) <= set(dumped) and set(example["output"]) <= set(dumped["output"])
    assert [p.output.finished for p in pieces][-1] is True
    counts = [p.output.num_completion_tokens for p in pieces if p.output.text]
    assert counts == sorted(counts) and counts[-1] <= 5
    assert len({p.request_id for p in pieces}) == 1


def test_completion_acreate_sync_and_streamed():
    async def main():
        response = await Completion.acreate(model=MODEL, prompt="Hello, my name is",
                                            max_new_tokens=8, temperature=0.2)
        pieces = [p async for p in await Completion.acreate(
            model=MODEL, prompt="Once upon a time", max_new_tokens=8, stream=True)]
        return response, pieces

    response, pieces = asyncio.run(main())
    assert response.output.text and response.output.num_completion_tokens <= 8
    assert pieces[-1].output.finished and "".join(p.output.text for p in pieces)


def test_return_token_log_probs_and_stop_sequences():
    response = Completion.create(model=MODEL, prompt="1, 2, 3, 4,", max_new_tokens=10,
                                 temperature=0, stop_sequences=["7"], return_token_log_probs=True)
    assert "7" not in response.output.text
    assert response.output.tokens and all(t.log_prob <= 0 for t in response.output.tokens)


def csv_script() -> str:
    """The document's CSV script, with its two capture defects repaired (module doc)."""
    script = python_block(TEXT, "import csv", "writer.writerows(data)")
    with pytest.raises(SyntaxError):  # as captured: the typo (and the lost indentation)
        compile(script, "seed-004-csv", "exec")
    fixed = script.replace('\n"Can I select my seat', '\n("Can I select my seat')
    head, _, body = fixed.partition("as file:\n")
    fixed = head + "as file:\n" + "\n".join("    " + line for line in body.split("\n"))
    assert fixed.count("\n") == script.count("\n") and len(fixed) - len(script) == 1 + 4 * 3
    return fixed


def wait_final(job_id: str, timeout_s: float = 900.0):
    deadline = time.monotonic() + timeout_s
    while (job := FineTune.get(job_id)).status not in FINAL:
        assert time.monotonic() < deadline, f"fine-tune still {job.status}"
        time.sleep(2)
    return job


def test_files_fine_tune_and_models_as_documented(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(csv_script(), "seed-004-csv", "exec"), {})  # writes customer_service_data.csv
    with open("customer_service_data.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5
    file = File.upload(open("customer_service_data.csv", "r"))  # "opened with open(path, 'r')"
    assert File.get(file.id).size == (tmp_path / "customer_service_data.csv").stat().st_size
    assert file.id in [f.id for f in File.list().files]
    on_disk = (tmp_path / "customer_service_data.csv").read_bytes()  # csv writes \r\n
    assert File.download(file.id).content.encode() == on_disk

    job = FineTune.create(model=MODEL, training_file=file.id)  # the defaults
    assert job.status in ("PENDING", "RUNNING")
    assert job.id in [j.id for j in FineTune.list().jobs]
    job = wait_final(job.id)
    assert job.status == "SUCCESS", job.error
    events = FineTune.get_events(job.id).events
    example = next(e for e in EXAMPLES if "events" in e)["events"][0]
    assert events and all(set(example) <= set(e.model_dump()) for e in events)
    assert not FineTune.cancel(job.id).success  # a finished job cannot be cancelled

    endpoints = Model.list().model_endpoints
    listed = next(e for e in EXAMPLES if "model_endpoints" in e)["model_endpoints"][0]
    assert all(set(listed) <= set(e.model_dump()) for e in endpoints)
    names = {e.name for e in endpoints}
    assert {MODEL, job.fine_tuned_model} <= names
    assert Model.get(job.fine_tuned_model).model_name == MODEL
    download = Model.download(job.fine_tuned_model, download_format="hugging_face")
    assert download.urls
    assert Model.delete(job.fine_tuned_model).deleted
    assert job.fine_tuned_model not in {e.name for e in Model.list().model_endpoints}
    with pytest.raises(APIError):  # "If called on a base model ..., an error will be thrown."
        Model.delete(MODEL)
    assert File.delete(file.id).deleted
