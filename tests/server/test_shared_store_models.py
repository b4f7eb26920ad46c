"""A fine-tuned model finished by another server sharing the jobs store (Ray Serve replicas,
servers on one database) is served here on first use, from its adapter directory."""

from __future__ import annotations

import openai
import pytest
from support.batching import batch_server

from lmforge.jobs.fine_tuning_store import FineTuningStore
from lmforge.jobs.store import Store
from lmforge.protocol.statuses import FineTuningStatus


def _finish_elsewhere(home, base: str, adapter: str) -> str:
    """What another server's fine-tuning worker leaves in the shared store: a succeeded job."""
    store = Store(home=home)
    jobs = FineTuningStore(store)
    job = jobs.add_job(base, "file-x", None, "other", 0, {}, None, None)
    name = f"ft:{base}:other:{job.id}"
    for status in (FineTuningStatus.QUEUED, FineTuningStatus.RUNNING):
        assert jobs.transition(job.id, status)
    assert jobs.transition(job.id, FineTuningStatus.SUCCEEDED, fine_tuned_model=name,
                           adapter_path=adapter)
    store.close()
    return name


def _logprobs(client, model: str) -> list[float]:
    choice = client.completions.create(model=model, prompt="The quick brown fox jumps",
                                       max_tokens=0, echo=True, logprobs=0).choices[0]
    return [round(x, 4) for x in choice.logprobs.token_logprobs[1:]]


def test_a_model_fine_tuned_by_another_server_is_served_on_first_use(
        tiny_llama_dir, tmp_path, make_peft_adapter):
    home = tmp_path / "home"
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "adapter", 3, ["q_proj", "v_proj"])
    with batch_server(tiny_llama_dir, home, fine_tuning=False) as client:  # trains nothing
        base = client.model_name
        assert [m.id for m in client.models.list().data] == [base]
        name = _finish_elsewhere(home, base, adapter)
        with pytest.raises(openai.NotFoundError):  # a name the store does not know
            client.completions.create(model=name + "x", prompt="hi", max_tokens=1)
        tuned = _logprobs(client, name)  # loaded now
        assert tuned != _logprobs(client, base)
        assert name in [m.id for m in client.models.list().data]
        chat = client.chat.completions.create(model=name, max_tokens=2,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.model == name
