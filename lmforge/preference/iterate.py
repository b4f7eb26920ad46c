"""``lmforge preference iterate --rounds N``: iterative DPO (seed 002's step 4).

Round k: the current policy (the base for k = 1) writes candidates, the judge scores them, the
pairs train a DPO job on the policy server (``/v1/fine_tuning/jobs``, ``method: dpo``, starting
from the current policy, so round 2 tunes round 1's ``ft:`` model), the server serves the new
adapter, and every model so far is evaluated on the held-out articles. ``iterate.json`` keeps
each round's job and model, so a killed run picks up where it stopped: a finished stage is not
redone and a submitted job is awaited, never submitted twice. The policy server must be one
that fine-tunes (lmforge).

Files: ``<run_dir>/round-<k>/`` (that round's ``generate`` files), ``<run_dir>/eval/`` (the
evaluation; see ``evaluate.py``), ``<run_dir>/iterate.json`` and ``<run_dir>/rounds.png``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tqdm import tqdm

from lmforge.preference.config import PipelineConfig
from lmforge.preference.endpoint import Endpoint
from lmforge.preference.errors import PipelineError
from lmforge.preference.evaluate import evaluate
from lmforge.preference.generate import generate
from lmforge.preference.report import rounds_chart

_FINAL = {"succeeded", "failed", "cancelled"}


async def iterate(config: PipelineConfig, rounds: int) -> list[dict]:
    """Run (or resume) ``rounds`` rounds; returns one row per round, round 0 being the base:
    ``round``, ``model``, ``pairs``, ``job_id``, ``share_ge3``, ``share_ge4``,
    ``win_rate_vs_base`` (each an interval dict with ``n``).

    Raises:
        PipelineError: a round's DPO job did not succeed (its error is in the message), or a
            stage's requests all failed.
    """
    state_path = config.run_dir / "iterate.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rounds": []}
    base = config.policy.model
    models = [base] + [r["model"] for r in state["rounds"] if r.get("model")]
    for k in range(1, rounds + 1):
        if k <= len(state["rounds"]) and state["rounds"][k - 1].get("model"):
            continue
        if k > len(state["rounds"]):
            state["rounds"].append({"round": k, "policy": models[-1]})
        entry = state["rounds"][k - 1]
        if "job_id" not in entry:
            result = await generate(config, policy_model=entry["policy"],
                                    run_dir=config.run_dir / f"round-{k}")
            entry["pairs"] = result.report["pairs"]
            entry["job_id"] = await _submit(config, entry["policy"], result.train_file,
                                            result.valid_file)
            _save(state_path, state)
        try:
            entry["model"] = await _await_job(config, entry["job_id"], k)
        except PipelineError:
            entry.pop("job_id")  # the job ended without a model: a rerun submits a new one
            _save(state_path, state)
            raise
        _save(state_path, state)
        models.append(entry["model"])
    report = await evaluate(config, models)
    table = _rows(state, report, base)
    state["table"] = table
    _save(state_path, state)
    rounds_chart(table, config.run_dir / "rounds.png")
    return table


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(path)


async def _submit(config: PipelineConfig, model: str, train: Path, valid: Path) -> str:
    endpoint = Endpoint(config.policy)
    try:
        return await _create_job(endpoint.client, config, model, train, valid)
    finally:
        await endpoint.aclose()


async def _create_job(client, config: PipelineConfig, model: str, train: Path,
                      valid: Path) -> str:
    training = await client.files.create(file=train.open("rb"), purpose="fine-tune")
    extra = {}
    if valid.stat().st_size:
        extra["validation_file"] = (await client.files.create(file=valid.open("rb"),
                                                              purpose="fine-tune")).id
    job = await client.fine_tuning.jobs.create(
        model=model, training_file=training.id, suffix=config.dpo.suffix,
        method={"type": "dpo", "dpo": {"hyperparameters": dict(config.dpo.hyperparameters)}},
        **extra)
    return job.id


async def _await_job(config: PipelineConfig, job_id: str, k: int) -> str:
    endpoint = Endpoint(config.policy)
    bar = tqdm(desc=f"round {k}: DPO job {job_id}", unit="step", leave=False)
    try:
        while True:
            job = await endpoint.client.fine_tuning.jobs.retrieve(job_id)
            bar.set_postfix_str(job.status)
            if job.status in _FINAL:
                break
            await asyncio.sleep(config.dpo.poll_seconds)
    finally:
        bar.close()
        await endpoint.aclose()
    if job.status != "succeeded" or not job.fine_tuned_model:
        raise PipelineError(f"round {k}: DPO job {job_id} ended {job.status}: {job.error}")
    return job.fine_tuned_model


def _rows(state: dict, report: dict, base: str) -> list[dict]:
    even = {"value": 0.5, "low": 0.5, "high": 0.5,
            "n": report["models"][base]["share_ge3"]["n"]}
    rows = [{"round": 0, "model": base, "share_ge3": report["models"][base]["share_ge3"],
             "share_ge4": report["models"][base]["share_ge4"], "win_rate_vs_base": even}]
    for entry in state["rounds"]:
        model = entry["model"]
        rows.append({"round": entry["round"], "model": model, "job_id": entry["job_id"],
                     "pairs": entry.get("pairs", {}).get("train"),
                     "share_ge3": report["models"][model]["share_ge3"],
                     "share_ge4": report["models"][model]["share_ge4"],
                     "win_rate_vs_base": report["win_rate"][model][base]})
    return rows
