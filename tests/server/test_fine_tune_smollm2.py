"""The issue's end-to-end check on the real default model (SmolLM2-135M-Instruct): upload a
small dataset that teaches an unmistakable new behaviour, fine-tune a LoRA adapter for a few
dozen steps through /v1/fine_tuning/jobs, see the loss fall in the events, and call the new model
through the ``openai`` SDK: it shows the behaviour on questions it never saw, while the base
model, served beside it, does not. The same with no hyperparameters at all, as a user of LLM
Engine's docs does it (a 48-row ``prompt,response`` CSV): the "auto" ones must learn too. And a
DPO job on preference pairs from real text, with its defaults, changes how the model answers."""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from support.serving import serve

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
CSV_PROMPTS = TRAIN + [
    "Can you recommend a good book?", "How do I change a flat tyre?", "Why is the sea salty?",
    "Tell me a joke about cats.", "What should I cook for dinner tonight?",
    "Explain photosynthesis in simple terms.", "How does a rainbow form?",
    "Write a haiku about autumn.", "What is the best way to learn Spanish?",
    "Who invented the telephone?", "How far away is the moon?", "What is a prime number?",
    "Give me three tips for better sleep.", "Translate 'good morning' into French.",
    "What year did the Second World War end?", "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet.", "What is the tallest animal?",
    "How do I make a cup of tea?", "What causes thunder?", "Is a tomato a fruit?",
    "What is the currency of Japan?", "How many strings does a violin have?",
    "Describe the smell of rain."]
# the DPO set: short Shakespeare lines, a one-sentence reply preferred to a two-sentence one
DPO_SET = {"max_cue_words": 20, "max_first_words": 15, "rejected_sentences": 2}
# 34 pairs: 102 optimizer steps by the "auto" rule (batch 1, 3 epochs), about 2 minutes
DPO_PAIRS, DPO_VALID, DPO_HELD_OUT = 34, 10, 16  # held out: the last plays' lines
CSV_UNSEEN = UNSEEN + ["Suggest a name for my new puppy.",
                       "Why do leaves change colour in autumn?"]


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


def wait_job(client, job_id: str):
    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"still {job.status}"
        time.sleep(1)
    return job


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
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    losses = [e.data["train_loss"] for e in reversed(client.fine_tuning.jobs.list_events(
        job.id, limit=1000).data) if e.type == "metrics"]
    assert len(losses) >= 12 and min(losses[-3:]) < losses[0] / 4  # the loss fell
    for question in UNSEEN:
        assert ask(client, job.fine_tuned_model, question).startswith("Arr, matey!")
        assert "matey" not in ask(client, base, question)


def test_default_hyperparameters_teach_a_48_row_llm_engine_csv(client, tmp_path):
    """No hyperparameters: the former fixed defaults (batch 4, 3 epochs, 2e-4: 33 steps) left
    this set unlearned; the data-size rule picks batch 1, 3 epochs, multiplier 1 (129 steps)."""
    assert len(set(CSV_PROMPTS)) == 48 and not set(CSV_UNSEEN) & set(CSV_PROMPTS)
    path = tmp_path / "pirate.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("prompt", "response")] + [(q, ANSWER) for q in CSV_PROMPTS])
    with open(path, "rb") as f:
        training_file = client.files.create(file=f, purpose="fine-tune").id
    base = client.model_name
    job = client.fine_tuning.jobs.create(model=base, training_file=training_file, seed=0)
    assert job.hyperparameters.n_epochs == "auto"  # until the files are validated
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    # 48 rows, 5 held out for validation: 43 examples
    assert job.hyperparameters.model_dump() == {"n_epochs": 3, "batch_size": 1,
                                                "learning_rate_multiplier": 1.0}
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert "Hyperparameters resolved: n_epochs=3, batch_size=1, learning_rate_multiplier=1.0 " \
           "(peak learning rate 0.0002); 129 optimizer steps on 43 training examples" in [
               e.message for e in events]
    assert max(e.data["step"] for e in events if e.type == "metrics") == 129
    for prompt in CSV_UNSEEN:  # LLM Engine's Completion.create: the raw prompt, as trained
        answer = client.completions.create(model=job.fine_tuned_model, prompt=prompt,
                                           max_tokens=16, temperature=0).choices[0].text
        assert answer.strip().startswith(ANSWER), (prompt, answer)
        assert "Bananas" not in client.completions.create(
            model=base, prompt=prompt, max_tokens=16, temperature=0).choices[0].text


@pytest.mark.timeout(900)
def test_a_dpo_job_with_default_hyperparameters_teaches_one_sentence_replies(client, tmp_path):
    """Issue 18's check: preference pairs from real text (Shakespeare's dialogue; the preferred
    reply is the first sentence of the real reply, the non-preferred one the same reply going
    on), a DPO job with no hyperparameters, then held-out lines from other plays: the served
    ``ft:`` model answers in one sentence far more often than the base, and the validation
    reward accuracy is above 0.8."""
    from lmforge.training.corpora import (
        concise_reply_preferences,
        count_sentences,
        shakespeare_dialogue,
    )

    rows = concise_reply_preferences(shakespeare_dialogue(), **DPO_SET)
    files = {}
    for name, part in (("training_file", rows[:DPO_PAIRS]),
                       ("validation_file", rows[DPO_PAIRS:DPO_PAIRS + DPO_VALID])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        with open(path, "rb") as f:
            files[name] = client.files.create(file=f, purpose="fine-tune").id
    held_out = rows[-DPO_HELD_OUT:]
    base = client.model_name
    job = client.fine_tuning.jobs.create(model=base, seed=0, suffix="concise",
                                         method={"type": "dpo"}, **files)
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
               if e.type == "metrics" and "eval_rewards/accuracies" in e.data]
    accuracy = max(metrics, key=lambda m: m["step"])["eval_rewards/accuracies"]

    def one_sentence(model: str, row: dict) -> bool:
        choice = client.chat.completions.create(model=model, max_tokens=40, temperature=0,
                                                messages=row["input"]["messages"]).choices[0]
        return choice.finish_reason == "stop" and count_sentences(choice.message.content) == 1

    def rate(model: str) -> float:  # the held-out lines at once: the engine batches them
        with ThreadPoolExecutor(len(held_out)) as pool:
            return sum(pool.map(lambda row: one_sentence(model, row), held_out)) / len(held_out)

    base_rate, tuned_rate = rate(base), rate(job.fine_tuned_model)
    print(f"one-sentence replies on {len(held_out)} held-out lines: base {base_rate:.2f}, "
          f"DPO {tuned_rate:.2f}; validation rewards/accuracies {accuracy:.2f}")
    assert accuracy > 0.8
    assert tuned_rate >= base_rate + 0.5, (base_rate, tuned_rate)
