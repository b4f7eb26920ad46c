"""Scheduler behaviour with a handful of blocks and hand-made sampled tokens (as vLLM's
tests/v1/core/test_scheduler.py); no model is loaded."""

from lmforge.config import SchedulerConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.request import Request, RequestStatus, SamplingParams
from lmforge.engine.scheduler import Scheduler

EOS = 2


def make_scheduler(num_blocks=32, block_size=4, budget=64, max_seqs=8, chunked=True,
                   max_model_len=128):
    bm = BlockManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_chunked_prefill=chunked)
    return Scheduler(cfg, bm, max_model_len)


def add(s: Scheduler, rid: str, n_prompt: int, max_tokens=4, **kw) -> Request:
    req = Request(rid, [10 + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens, **kw),
                  eos_token_ids=frozenset({EOS}))
    s.add_request(req)
    return req


def run_step(s: Scheduler, token: int = 5):
    out = s.schedule()
    finished = s.update(out, [token] * len(out.sampling_requests()))
    return out, finished


def test_prefill_then_decode_one_token_per_step():
    s = make_scheduler()
    req = add(s, "a", 10)
    out, _ = run_step(s)
    assert out.num_new_tokens == [10] and out.will_sample == [True]
    out, _ = run_step(s)
    assert out.num_new_tokens == [1]
    assert req.num_computed_tokens == 11 and req.num_output_tokens == 2


def test_chunked_prefill_respects_budget_and_samples_only_at_the_end():
    s = make_scheduler(budget=8)
    req = add(s, "a", 20)
    chunks = []
    while req.num_output_tokens == 0:
        out, _ = run_step(s)
        chunks.append((out.num_new_tokens[0], out.will_sample[0]))
    assert chunks == [(8, False), (8, False), (4, True)]


def test_decodes_keep_flowing_while_a_long_prompt_is_chunked():
    s = make_scheduler(budget=8)
    a = add(s, "a", 4, max_tokens=20)
    run_step(s)
    add(s, "b", 30)
    out, _ = run_step(s)
    assert out.requests[0] is a and out.num_new_tokens == [1, 7]
    assert out.total_num_tokens <= 8


def test_max_tokens_eos_and_context_length_finish_requests():
    s = make_scheduler(max_model_len=12)
    a = add(s, "a", 4, max_tokens=2)
    b = add(s, "b", 4, max_tokens=10)
    c = add(s, "c", 8, max_tokens=None)
    run_step(s)  # every request gets its first token
    out = s.schedule()
    tokens = {"a": 5, "b": EOS, "c": 5}
    finished = s.update(out, [tokens[r.request_id] for r in out.sampling_requests()])
    assert {r.request_id for r in finished} == {"a", "b"}
    assert a.status == RequestStatus.FINISHED_LENGTH and a.status.finish_reason == "length"
    assert b.status == RequestStatus.FINISHED_STOPPED and b.status.finish_reason == "stop"
    while not c.status.is_finished():
        run_step(s)
    assert c.num_tokens == 12 and c.status == RequestStatus.FINISHED_LENGTH
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_ignore_eos_and_stop_token_ids():
    s = make_scheduler()
    a = add(s, "a", 4, max_tokens=3, ignore_eos=True)
    b = add(s, "b", 4, max_tokens=3, stop_token_ids=[7])
    out = s.schedule()
    s.update(out, [EOS, 7])
    assert not a.status.is_finished() and b.status == RequestStatus.FINISHED_STOPPED


def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(max_seqs=2)
    for i in range(4):
        add(s, f"r{i}", 4)
    out, _ = run_step(s)
    assert len(out.requests) == 2 and len(s.waiting) == 2


def test_preemption_under_block_pressure_recomputes_and_everyone_finishes():
    # 6 blocks of 4 tokens; three requests that each grow to 12 tokens cannot all fit
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    reqs = [add(s, f"r{i}", 6, max_tokens=6) for i in range(3)]
    preempted = 0
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        out, _ = run_step(s)
        preempted += len(out.preempted)
        used = s.block_manager.num_blocks - s.block_manager.num_free_blocks
        assert used <= 6
    assert preempted > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6 for r in reqs)
    assert s.block_manager.num_free_blocks == 6


def test_preempted_request_is_recomputed_from_scratch_with_its_outputs():
    s = make_scheduler(num_blocks=4, block_size=4)
    a = add(s, "a", 6, max_tokens=8)
    b = add(s, "b", 6, max_tokens=8)
    victim = None
    for _ in range(20):
        out, _ = run_step(s)
        if out.preempted:
            victim = out.preempted[0]
            break
    assert victim is b and b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b
    n_out = b.num_output_tokens
    while b.status != RequestStatus.RUNNING or b.num_computed_tokens == 0:
        out, _ = run_step(s)
    # when it ran again, it recomputed prompt + earlier outputs in one prefill
    assert b.num_output_tokens == n_out + 1
    assert a.status.is_finished() or a.status == RequestStatus.RUNNING


def test_prefix_hit_is_reported_as_cached_tokens():
    s = make_scheduler(block_size=4)
    a = add(s, "a", 13)
    run_step(s)
    b = Request("b", a.prompt_token_ids[:12] + [99], SamplingParams(max_tokens=2))
    s.add_request(b)
    out, _ = run_step(s)
    assert b.num_cached_tokens == 12
    assert out.num_new_tokens[out.requests.index(b)] == 1


def test_abort_frees_blocks_immediately():
    s = make_scheduler()
    add(s, "a", 10, max_tokens=50)
    add(s, "b", 10, max_tokens=50)
    run_step(s)
    s.abort_request("a")
    assert s.requests.keys() == {"b"}
    s.abort_request("b")
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert not s.has_unfinished_requests()
