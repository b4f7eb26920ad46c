"""The pipeline's YAML config (``lmforge preference ... --config pipeline.yaml``), with seed 002's
values as defaults. Every section and key is optional except the two endpoints' ``model``::

    run_dir: runs/summaries            # every stage writes its JSONL here (relative to the YAML)
    ray_address: auto                  # optional: send each stage's requests from Ray Data tasks
    data:
      corpus: lee_background           # or input: articles.jsonl with text_field: article
      limit: 100                       # articles that become preference pairs
      eval_limit: 20                   # further articles, disjoint, for `evaluate` and `iterate`
    judge:  {base_url: http://127.0.0.1:8000/v1, model: smollm2-135m-instruct}
    policy: {base_url: http://127.0.0.1:8000/v1, model: smollm2-135m-instruct}
    questions:  {num_questions: 5, max_tokens: 1024, max_question_chars: 150,
                 max_choice_chars: 60, prompt: "..."}
    candidates: {num_candidates: 10, temperature: 0.8, top_p: 0.95, max_tokens: 96, prompt: "..."}
    answers:    {max_tokens: 96, shuffle_choices: article, prompt: "..."}
    pairing:    {low_score: 2, min_word_gap: 2, min_words: 5, max_words: 199,
                 max_pairs_per_article: 3, valid_fraction: 0.02}
    evaluate:   {temperature: 0.0, models: {gpt-4o: {base_url: https://api.openai.com/v1, ...}}}
    dpo:        {hyperparameters: {beta: 0.1, n_epochs: 1}, suffix: summaries}

An endpoint is any OpenAI-compatible server: ``base_url``, ``model``, ``api_key`` (default: the
environment variable named by ``api_key_env``, ``OPENAI_API_KEY``, else "unused"),
``max_concurrency`` (requests in flight when not batching), ``batches`` (``auto``: through
``/v1/batches`` for stages of ``batch_threshold`` requests or more when the server has the route;
``true``; ``false``), ``structured_output`` (``auto``: JSON-schema response formats when a probe
request shows the server honours them; ``true``; ``false``) and ``timeout`` (seconds).

``ray_address`` (default: unset, every request goes out from this process) runs each stage as a
Ray Data ``map_batches`` over its requests (``lmforge.cluster.preference_data``; needs
``pip install 'lmforge[ray]'``): ``auto`` joins the running cluster (``RAY_ADDRESS``, else the
one ``ray start`` made on this machine), ``local`` starts a single-machine cluster for this run,
and ``host:6379`` or ``ray://host:10001`` joins that one (Ray's own ``ray.init(address=...)``
values). Each task sends up to ``max_concurrency`` requests at once; the files written are the
same as without Ray, resumable the same way.

The prompts are ``str.format`` templates: questions get ``{article}`` and ``{num_questions}``,
candidates ``{article}``, answers ``{summary}`` and ``{questions}`` (numbered, with choices).
Their wording is ours; the task they state is the seed's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lmforge.preference.rules import PairingRule


class ConfigError(ValueError):
    """The config names an unknown key, a bad value, or misses a required one (the message says
    which, with its section)."""


QUESTIONS_PROMPT = (
    "Read the news article below and write {num_questions} multiple-choice questions about its "
    "key facts. Each question has five choices, A to E, and exactly one of them is correct; the "
    "others must be plausible but wrong.\n\n"
    "Article:\n{article}\n\n"
    'Reply in JSON: {{"questions": [{{"question": "...", "choices": {{"A": "...", "B": "...", '
    '"C": "...", "D": "...", "E": "..."}}, "answer": "<the correct letter>"}}, ...]}}')
CANDIDATES_PROMPT = ("Write a very short summary of the following article, at most 2 sentences."
                     "\n\nArticle:\n{article}")
ANSWERS_PROMPT = (
    "Below are multiple-choice questions about a news article, then a summary of it. Answer "
    'each question using only the summary. If the summary does not give the answer, reply '
    '"Unsure" for that question; do not guess.\n\n'
    "Questions:\n{questions}\n\nSummary:\n{summary}\n\n"
    'Reply in JSON: {{"answers": [...]}}, one answer per question, in order: the letter of the '
    'correct choice, or "Unsure".')
# The questions come before the summary so that the prompts of one article's candidates share
# their longest part: the server's prefix cache computes it once per article.


@dataclass
class EndpointConfig:
    """An OpenAI-compatible endpoint and the model the pipeline asks there."""

    model: str
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 16
    batches: str | bool = "auto"
    batch_threshold: int = 64
    structured_output: str | bool = "auto"
    timeout: float = 600.0

    def key(self) -> str:
        return self.api_key or os.environ.get(self.api_key_env) or "unused"


@dataclass
class DataConfig:
    corpus: str | None = "lee_background"
    input: str | None = None  # a JSONL file of articles; overrides corpus
    text_field: str = "article"
    id_field: str | None = None  # default: the article's line number
    limit: int = 100
    eval_limit: int = 20


@dataclass
class QuestionsConfig:
    num_questions: int = 5
    max_tokens: int = 1024
    max_question_chars: int = 150  # caps in the JSON schema (see parsing.questions_schema)
    max_choice_chars: int = 60
    temperature: float = 0.0
    prompt: str = QUESTIONS_PROMPT


@dataclass
class CandidatesConfig:
    num_candidates: int = 10
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 96
    prompt: str = CANDIDATES_PROMPT


@dataclass
class AnswersConfig:
    max_tokens: int = 96
    temperature: float = 0.0
    # the choices' order shown to the answering judge, against position bias
    # (parsing.shuffle_choices): "article" (one order per article: its candidates are judged on
    # identical questions), "summary" (a new order per summary), "none" (the writer's order)
    shuffle_choices: str = "article"
    prompt: str = ANSWERS_PROMPT


@dataclass
class EvaluateConfig:
    temperature: float = 0.0  # one summary per article and model; 0 = each model's greedy best
    top_p: float = 1.0
    max_tokens: int = 96
    models: dict[str, EndpointConfig] = field(default_factory=dict)  # names off the policy server


@dataclass
class DPOConfig:
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the job's method.dpo ones
    suffix: str | None = "preference"
    poll_seconds: float = 2.0


@dataclass
class PipelineConfig:
    """The whole config; ``load_config`` reads it."""

    judge: EndpointConfig
    policy: EndpointConfig
    run_dir: Path = Path("preference-run")
    seed: int = 21  # the seed's shuffle seed: the hold-out split
    ray_address: str | None = None  # send the stages' requests from Ray Data tasks (see above)
    data: DataConfig = field(default_factory=DataConfig)
    questions: QuestionsConfig = field(default_factory=QuestionsConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    answers: AnswersConfig = field(default_factory=AnswersConfig)
    pairing: PairingRule = field(default_factory=PairingRule)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


_SECTIONS = {"data": DataConfig, "questions": QuestionsConfig, "candidates": CandidatesConfig,
             "answers": AnswersConfig, "pairing": PairingRule, "dpo": DPOConfig}


def load_config(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Read ``path`` (YAML); relative ``run_dir`` and ``data.input`` are resolved against the
    file's directory. ``overrides`` replace top-level keys (the CLI's ``--run-dir``).

    Raises:
        ConfigError: unreadable YAML, an unknown key, a missing endpoint model, a bad value.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    config = config_from_dict(raw)
    if not config.run_dir.is_absolute():
        config.run_dir = path.parent / config.run_dir
    if config.data.input and not Path(config.data.input).is_absolute():
        config.data.input = str(path.parent / config.data.input)
    return config


def config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    """Build and validate a ``PipelineConfig`` from a parsed YAML mapping (see ``load_config``)."""
    known = {f.name for f in fields(PipelineConfig)}
    _no_unknown(raw, known, "the config")
    for name in ("judge", "policy"):
        if not isinstance(raw.get(name), dict) or not raw[name].get("model"):
            raise ConfigError(f"'{name}' needs at least a 'model' (and usually a 'base_url')")
    kwargs: dict[str, Any] = {"judge": _endpoint(raw["judge"], "judge"),
                              "policy": _endpoint(raw["policy"], "policy")}
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"'{name}' must be a mapping")
        _no_unknown(section, {f.name for f in fields(cls)}, f"'{name}'")
        try:
            kwargs[name] = cls(**section)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
    evaluate = dict(raw.get("evaluate") or {})
    _no_unknown(evaluate, {f.name for f in fields(EvaluateConfig)}, "'evaluate'")
    evaluate["models"] = {name: _endpoint(spec, f"evaluate.models.{name}")
                          for name, spec in (evaluate.get("models") or {}).items()}
    kwargs["evaluate"] = EvaluateConfig(**evaluate)
    if "run_dir" in raw:
        kwargs["run_dir"] = Path(raw["run_dir"])
    if "seed" in raw:
        kwargs["seed"] = int(raw["seed"])
    if raw.get("ray_address") is not None:
        if not isinstance(raw["ray_address"], str) or not raw["ray_address"].strip():
            raise ConfigError("'ray_address' must be auto, local, or a cluster address such as "
                              "host:6379 or ray://host:10001 (leave it out to run without Ray)")
        kwargs["ray_address"] = raw["ray_address"].strip()
    config = PipelineConfig(**kwargs)
    _check(config)
    return config


def _endpoint(raw: Any, where: str) -> EndpointConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping with base_url and model")
    _no_unknown(raw, {f.name for f in fields(EndpointConfig)}, f"'{where}'")
    endpoint = EndpointConfig(**raw)
    for key in ("batches", "structured_output"):
        if getattr(endpoint, key) not in ("auto", True, False):
            raise ConfigError(f"'{where}.{key}' must be auto, true or false")
    if endpoint.max_concurrency < 1:
        raise ConfigError(f"'{where}.max_concurrency' must be at least 1")
    return endpoint


def _no_unknown(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(known))}")


def _check(config: PipelineConfig) -> None:
    data = config.data
    if data.input is None and data.corpus not in CORPORA:
        raise ConfigError(f"data.corpus must be one of {sorted(CORPORA)}, or give data.input")
    if data.limit < 1 or data.eval_limit < 0:
        raise ConfigError("data.limit must be at least 1 and data.eval_limit at least 0")
    if config.questions.num_questions < 1:
        raise ConfigError("questions.num_questions must be at least 1")
    for name, prompt, fields_ in (
            ("questions.prompt", config.questions.prompt, ("article", "num_questions")),
            ("candidates.prompt", config.candidates.prompt, ("article",)),
            ("answers.prompt", config.answers.prompt, ("summary", "questions"))):
        try:
            prompt.format(**{f: "" for f in fields_})
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{name} may use only {{{'}, {'.join(fields_)}}} (and {{{{ }}}} "
                              f"for literal braces): {type(exc).__name__}: {exc}") from exc
    if config.answers.shuffle_choices not in ("article", "summary", "none"):
        raise ConfigError("answers.shuffle_choices must be article, summary or none")
    if config.candidates.num_candidates < 2:
        raise ConfigError("candidates.num_candidates must be at least 2 (pairs need two)")


CORPORA = {"lee_background"}  # the names data.corpus accepts (preference/articles.py reads them)
