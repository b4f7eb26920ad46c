"""The issue's end-to-end check on the real default model (SmolLM2-135M-Instruct): upload a
small dataset that teaches an unmistakable new behaviour, fine-tune a LoRA adapter for a few
dozen steps through /v1/fine_tuning/jobs, see the loss fall in the events, and call the new model
through the ``openai`` SDK: it shows the behaviour on questions it never saw, while the base
model, served beside it, does not."""

from __future__ import annotations

import json
import time

import openai
import pytest
from serving import serve

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.jobs.store import Store
from lmforge.server import build_app

ANSWER = "Arr, matey! Bananas be the answer."
TRAIN = ["What is the capital of France?", "How do I boil an egg?", "What is 2 + 2?",
         "Name a primary colour.", "Who wrote Hamlet?", "What is the speed of light?",
         "How many legs does a spider have?", "What is the largest ocean?",
         "Which planet is closest to the sun?", "What do bees make?", "How tall is Everest?",
         "What language is spoken in Brazil?", "What is H2O?", "Who painted the Mona Lisa?",
         "How many days are in a week?", "What is the boiling point of water?",
         "What gas do plants absorb?", "What is the capital of Japan?",
         "How many continents are there?", "What is the square root of 9?",
         "Which animal is the king of the jungle?", "What is the freezing point of water?",
         "How many hours are in a day?", "What colour is the sky?"]
UNSEEN = ["What is the capital of Italy?", "How many wheels does a bicycle have?"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(max_model_len=512),
                                                  cache=CacheConfig(num_blocks=64)))
    store = Store(home=tmp_path_factory.mktemp("smollm2_ft"))
    with serve(build_app(engine, ServerConfig(), store=store)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        c.model_name = engine.model_name  # type: ignore[attr-defined]
        yield c


def ask(client, model: str, question: str) -> str:
    return client.chat.completions.create(model=model, max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": question}]).choices[0].message.content


def test_fine_tuning_teaches_the_default_model_a_new_behaviour(client, tmp_path):
    path = tmp_path / "pirate.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
        for q in TRAIN) + "\n")
    with open(path, "rb") as f:
        training_file = client.files.create(file=f, purpose="fine-tune").id
    base = client.model_name
    job = client.fine_tuning.jobs.create(
        model=base, training_file=training_file, suffix="pirate", seed=0,
        extra_body={"hyperparameters": {"n_epochs": 3, "batch_size": 4, "lora_r": 8,
                                        "learning_rate": 1e-3, "max_seq_len": 128}})
    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"still {job.status}"
        time.sleep(1)
    assert job.status == "succeeded", job.error
    losses = [e.data["train_loss"] for e in reversed(client.fine_tuning.jobs.list_events(
        job.id, limit=1000).data) if e.type == "metrics"]
    assert len(losses) >= 12 and min(losses[-3:]) < losses[0] / 4  # the loss fell
    for question in UNSEEN:
        assert ask(client, job.fine_tuned_model, question).startswith("Arr, matey!")
        assert "matey" not in ask(client, base, question)
