"""One ``/metrics`` page for many replicas: every replica's samples, labelled ``replica``.

Each replica's page is parsed with ``prometheus_client``'s text parser and written back in the
Prometheus text format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/)
with ``replica="engine-0"`` (...) added to every sample, a family's ``HELP``/``TYPE`` once for
all replicas, as a federating Prometheus would show them. Sum over the label to aggregate
(``sum without (replica) (lmforge_requests_total)``).
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def merge_pages(pages: dict[str, str], label: str = "replica") -> str:
    """``{replica name: its /metrics text}`` -> one page with ``label`` on every sample.

    Raises:
        ValueError: a page is not in the Prometheus text format.
    """
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, sample lines)
    for replica, text in pages.items():
        for family in text_string_to_metric_families(text):
            # the parser names a counter without its _total; the text format 0.0.4 (and
            # prometheus_client's own pages) names it with
            name = family.name + "_total" if family.type == "counter" else family.name
            kind, doc, lines = families.setdefault(
                name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {label: replica, **sample.labels}
                lines.append(f"{sample.name}{_labels(labels)} {_value(sample.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        if doc:
            out.append(f"# HELP {name} {_escape_help(doc)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(doc: str) -> str:
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def _value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(float(value))
