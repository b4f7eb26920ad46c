"""Scheduler behaviour with a handful of blocks and hand-made sampled tokens (as vLLM's
tests/v1/core/test_scheduler.py); no model is loaded."""

import random

from lmforge.config import SchedulerConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.request import BATCH_PRIORITY, Request, RequestStatus, SamplingParams
from lmforge.engine.scheduler import Scheduler

EOS = 2


def make_scheduler(num_blocks=32, block_size=4, budget=64, max_seqs=8, chunked=True,
                   max_model_len=128):
    bm = BlockManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_chunked_prefill=chunked)
    return Scheduler(cfg, bm, max_model_len)


def add(s: Scheduler, rid: str, n_prompt: int, max_tokens=4, **kw) -> Request:
    req = Request(rid, [10 + i for i in range(n_prompt)],
                  SamplingParams(max_tokens=max_tokens, **kw), eos_token_ids=frozenset({EOS}))
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


# ------------------------------------------------------------------------------------ priorities


def add_p(s: Scheduler, rid: str, n_prompt: int, priority: int, max_tokens=4, **kw) -> Request:
    """A request at ``priority`` whose prompt starts with a unique token (no prefix hits)."""
    req = Request(rid, [1000 + len(s._arrival)] + [10 + i for i in range(n_prompt - 1)],
                  SamplingParams(max_tokens=max_tokens, **kw), eos_token_ids=frozenset({EOS}),
                  priority=priority)
    s.add_request(req)
    return req


def with_cap(s: Scheduler, cap: int) -> Scheduler:
    s.config.max_background_prefill_tokens = cap
    return s


def scheduled(out) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(out.requests, out.num_new_tokens)]


def test_online_requests_are_admitted_before_earlier_batch_requests():
    s = make_scheduler(max_seqs=2)
    add_p(s, "b0", 6, BATCH_PRIORITY)
    add_p(s, "b1", 6, BATCH_PRIORITY)
    add_p(s, "o0", 6, 0)
    add_p(s, "o1", 6, 0)
    assert [r.request_id for r in s.waiting] == ["o0", "o1", "b0", "b1"]
    out, _ = run_step(s)
    assert scheduled(out) == [("o0", 6), ("o1", 6)]
    assert [r.request_id for r in s.waiting] == ["b0", "b1"]


def test_batch_work_waits_while_an_online_request_prefills_and_prefill_is_capped_otherwise():
    s = with_cap(make_scheduler(budget=24), 16)
    add_p(s, "dec", 4, BATCH_PRIORITY, max_tokens=20)
    add_p(s, "big", 40, BATCH_PRIORITY, max_tokens=20)
    out, _ = run_step(s)
    assert scheduled(out) == [("dec", 4), ("big", 12)]  # 16 batch prefill tokens in all
    add_p(s, "online", 40, 0)
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 24)]  # the batch yields the whole step
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 16)] and out.will_sample == [True]
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 1), ("dec", 1), ("big", 16)]  # capped again
    add_p(s, "online2", 1, 0)  # a one-token prompt is no prefill to wait for
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 1), ("online2", 1), ("dec", 1)]  # big still waits
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 1), ("online2", 1), ("dec", 1), ("big", 12)]


def test_no_cap_lets_batch_prefill_use_the_whole_budget():
    s = with_cap(make_scheduler(budget=24), 0)
    add_p(s, "big", 40, BATCH_PRIORITY)
    out, _ = run_step(s)
    assert scheduled(out) == [("big", 24)]


def test_online_prefill_is_never_capped():
    s = with_cap(make_scheduler(budget=64), 8)
    add_p(s, "online", 40, 0)
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 40)]


def test_kv_pressure_preempts_the_lowest_priority_latest_request_first():
    # 7 blocks of 4 tokens: two batch requests, then an online one that arrives last
    s = make_scheduler(num_blocks=7, block_size=4)
    b1 = add_p(s, "b1", 4, BATCH_PRIORITY, max_tokens=20)
    b2 = add_p(s, "b2", 4, BATCH_PRIORITY, max_tokens=20)
    run_step(s)
    online = add_p(s, "online", 4, 0, max_tokens=20)
    victims = []
    for _ in range(30):
        out, _ = run_step(s)
        victims += out.preempted
        if victims:
            break
    assert [r.request_id for r in s.running][0] == "online"
    assert victims[0] is b2  # not the online request, though it arrived last
    assert online.status == RequestStatus.RUNNING and b1.status == RequestStatus.RUNNING
    assert s.waiting[0] is b2  # back at the front of its class


def test_a_full_batch_makes_room_for_an_online_request():
    s = with_cap(make_scheduler(max_seqs=2, budget=64), 16)
    b1 = add_p(s, "b1", 4, BATCH_PRIORITY, max_tokens=20)
    b2 = add_p(s, "b2", 40, BATCH_PRIORITY, max_tokens=20)
    out, _ = run_step(s)
    assert scheduled(out) == [("b1", 4), ("b2", 12)]
    online = add_p(s, "online", 8, 0)
    out, _ = run_step(s)  # the latest batch request gives its slot to the online one
    assert out.preempted == [b2] and scheduled(out) == [("online", 8)]
    assert b2.num_computed_tokens == 0 and s.waiting == [b2]
    out, _ = run_step(s)  # no slot for b2, and b1 (same priority) is not preempted for it
    assert scheduled(out) == [("online", 1), ("b1", 1)] and not out.preempted
    assert online.status == b1.status == RequestStatus.RUNNING and s.waiting == [b2]


def test_a_waiting_request_held_back_by_a_better_prefill_preempts_nobody_and_waits():
    s = with_cap(make_scheduler(max_seqs=2, budget=24), 0)
    add_p(s, "p2", 4, 2, max_tokens=20)
    run_step(s)
    add_p(s, "online", 40, 0)
    run_step(s)
    add_p(s, "p1", 4, 1)  # better than p2, but its prefill waits for the online one's
    queries = s.block_manager.num_queries
    out, _ = run_step(s)
    assert scheduled(out) == [("online", 16)] and not out.preempted
    assert s.block_manager.num_queries == queries  # not even looked up in the prefix cache


def schedule_trace(priority: int, cap: int) -> list:
    """Step-by-step schedule of a preemption-heavy workload where every request has one
    priority."""
    s = with_cap(make_scheduler(num_blocks=10, block_size=4, budget=16, max_seqs=3), cap)
    for i in range(5):
        add_p(s, f"r{i}", 5 + 3 * i, priority, max_tokens=6)
    trace = []
    while s.has_unfinished_requests():
        out, _ = run_step(s)
        trace.append((scheduled(out), [r.request_id for r in out.preempted]))
    return trace


def test_one_priority_class_without_the_cap_schedules_as_before():
    online = schedule_trace(0, cap=8)  # the cap never applies to priority 0
    assert any(preempted for _, preempted in online)
    assert schedule_trace(BATCH_PRIORITY, cap=0) == online


def test_random_mixed_priority_workloads_never_stall_and_free_every_block():
    # Without preemption for admission, a full set of held-back batch prefills and a waiting
    # online request would schedule nothing forever; several of these seeds build that state.
    for seed in range(200):
        rng = random.Random(seed)
        num_blocks, block_size, max_seqs = rng.randint(8, 20), 4, rng.randint(1, 4)
        s = with_cap(make_scheduler(num_blocks=num_blocks, block_size=block_size,
                                    budget=max(rng.choice([8, 16, 32]), max_seqs),
                                    max_seqs=max_seqs, max_model_len=10**6),
                     rng.choice([0, 1, 4, 8]))
        arrivals = [(rng.randint(0, 15), Request(
            f"r{i}", [rng.randint(3, 6) for _ in range(rng.randint(1, 2 * (num_blocks - 2)))],
            SamplingParams(max_tokens=rng.randint(1, 6)), priority=rng.choice([0, 1, 2])))
            for i in range(rng.randint(2, 10))]
        for step in range(500):
            for t, r in arrivals:
                if t == step:
                    s.add_request(r)
            if step > 15 and not s.has_unfinished_requests():
                break
            out, _ = run_step(s, token=7)
            assert out.requests or step <= 15 or not s.has_unfinished_requests(), \
                f"seed {seed}: step {step} scheduled nothing: {s.running} {s.waiting}"
        assert all(r.status.is_finished() for _, r in arrivals), f"seed {seed}"
        assert s.block_manager.num_free_blocks == num_blocks, f"seed {seed}"


def held(s: Scheduler, rid: str, after: str, n_prompt: int) -> Request:
    req = Request(rid, [10 + i for i in range(n_prompt)], SamplingParams(max_tokens=4),
                  eos_token_ids=frozenset({EOS}))
    s.add_request(req, after=after)
    return req


def test_a_request_after_another_waits_for_its_prefix_then_reads_the_cache():
    """``after=``: WAITING_FOR_PREFIX (not scheduled, counted as waiting) until the first request
    has computed the shared prompt; then queued, its full blocks read from the prefix cache."""
    s = make_scheduler(budget=8)
    first = add(s, "first", 12)
    second = held(s, "second", "first", 12)
    assert second.status == RequestStatus.WAITING_FOR_PREFIX and s.num_waiting == 2
    out, _ = run_step(s)  # 8 of the 12 prompt tokens: no output yet, still held
    assert out.requests == [first] and second.status == RequestStatus.WAITING_FOR_PREFIX
    run_step(s)  # the prompt's last 4 tokens and the first sample: released
    assert second.status == RequestStatus.WAITING and s.waiting == [second] and not s.held
    out, _ = run_step(s)
    assert second in out.requests and second.num_cached_tokens == 8  # 2 full blocks of 3


def test_unknown_or_finished_first_requests_queue_at_once_and_aborts_leave_nothing():
    s = make_scheduler()
    assert held(s, "x", "nobody", 4).status == RequestStatus.WAITING
    add(s, "first", 8)
    lone = held(s, "lone", "first", 8)
    s.abort_request("lone")
    assert lone.status == RequestStatus.FINISHED_ABORTED and not s.held
    assert "lone" not in s.requests and s.num_waiting == 2
