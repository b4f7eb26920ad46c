"""Batch input validation (``jobs/batch_lines.parse_input``) on the cases an upload can still carry:
invalid JSON, not UTF-8, empty, and the offline runner's mixed endpoints."""

from __future__ import annotations

import json

from lmforge.jobs.batch_lines import parse_input

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def line(custom_id, url="/v1/chat/completions", body=CHAT, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def codes(data: bytes, endpoint="/v1/chat/completions"):
    lines, errors = parse_input(data, endpoint, {"m"})
    return [x.custom_id for x in lines], [(e["line"], e["code"]) for e in errors]


def test_valid_lines_keep_their_file_line_index_and_blank_lines_are_skipped():
    data = f"{line('a')}\n\n{line('b')}\n".encode()
    lines, errors = parse_input(data, "/v1/chat/completions", {"m"})
    assert errors == [] and [(x.index, x.custom_id, x.url) for x in lines] == [
        (0, "a", "/v1/chat/completions"), (2, "b", "/v1/chat/completions")]


def test_invalid_json_not_utf8_and_empty_files():
    assert codes(f"{line('a')}\n{{oops\n".encode()) == (["a"], [(2, "invalid_json_line")])
    assert codes(b"\xff\xfe")[1] == [(None, "invalid_json_line")]
    assert codes(b"\n\n")[1] == [(None, "empty_file")]


def test_the_offline_runner_takes_any_known_endpoint_per_line():
    data = "\n".join([line("a"), line("b", "/v1/completions", {"model": "m", "prompt": "x"}),
                      line("c", "/v1/responses")]).encode()
    assert codes(data, None) == (["a", "b"], [(3, "mismatched_endpoint")])
    assert codes(data)[1] == [(2, "mismatched_endpoint"), (3, "mismatched_endpoint")]


def test_a_line_url_may_leave_out_the_v1_prefix_as_sglang_writes_it():
    data = "\n".join([line("a", "/chat/completions"), line("b"),
                      line("c", "/completions", {"model": "m", "prompt": "x"}),
                      line("d", "/chat/completions/")]).encode()
    lines, errors = parse_input(data, "/v1/chat/completions", {"m"})
    assert [(x.custom_id, x.url) for x in lines] == [("a", "/v1/chat/completions"),
                                                     ("b", "/v1/chat/completions")]
    # another endpoint kind, or a path that is none, still fails validation
    assert [(e["line"], e["code"]) for e in errors] == [(3, "mismatched_endpoint"),
                                                        (4, "mismatched_endpoint")]
