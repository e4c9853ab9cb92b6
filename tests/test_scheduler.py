"""The continuous-batching scheduler on its own: decode-first with a prefill budget, the batch limit,
preemption when blocks run out, prefix hits at admission, and no leaked block. A stand-in for the model:
each step just marks the planned tokens computed, and a sequence with none left 'samples' a token."""

import random

from ingot.engine.block_manager import BlockManager
from ingot.engine.scheduler import Scheduler, Sequence


def seq(n_prompt: int, first: int = 0, max_new: int = 3) -> Sequence:
    return Sequence(list(range(first, first + n_prompt)), n_prompt, owner={"max_new": max_new})


def step(sched: Scheduler, finished: list | None = None):
    """One step; returns its plan as [(sequence, tokens fed)]."""
    plan = sched.schedule()
    assert len({id(s) for s, _ in plan}) == len(plan)
    for s, n in plan:
        assert 1 <= n <= s.pending
        assert len(s.blocks) * sched.blocks.block_size >= s.computed + n  # the blocks are there first
        sched.advance(s, n)
        if s.pending == 0:
            s.tokens.append(1000 + len(s.tokens))
            if len(s.tokens) - s.n_prompt >= s.owner["max_new"]:
                sched.remove(s)
                if finished is not None:
                    finished.append(s)
    return plan


def test_decodes_come_first_and_a_long_prompt_is_chunked():
    sched = Scheduler(BlockManager(64, block_size=4), max_batch=4, step_tokens=16)
    a, b = seq(3, max_new=50), seq(5, first=10, max_new=50)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prompts in one step
    long = seq(40, first=100)
    sched.add(long)
    fed = 0
    while long.pending > 1 or long.computed == 0:
        plan = dict((id(s), n) for s, n in step(sched))
        assert plan[id(a)] == 1 and plan[id(b)] == 1  # the running streams never wait for the prefill
        assert sum(plan.values()) <= 16
        fed += plan.get(id(long), 0)
        if len(long.tokens) > 40:
            break
    assert fed == 40 and long.computed == 40  # 14 per step over three steps


def test_the_batch_never_exceeds_max_batch_and_everything_finishes_leak_free():
    blocks = BlockManager(32, block_size=4)
    sched = Scheduler(blocks, max_batch=2, step_tokens=8)
    rng = random.Random(0)
    seqs = [seq(rng.randrange(1, 20), first=i * 50, max_new=rng.randrange(1, 6)) for i in range(7)]
    for s in seqs:
        sched.add(s)
    finished = []
    for _ in range(200):
        if not (sched.running or sched.waiting):
            break
        step(sched, finished)
        assert len(sched.running) <= 2
    assert set(map(id, finished)) == set(map(id, seqs))
    assert all(len(s.tokens) - s.n_prompt == s.owner["max_new"] for s in seqs)
    assert blocks.used == 0


def test_out_of_blocks_preempts_the_newest_which_recomputes_later():
    blocks = BlockManager(6, block_size=4, prefix_cache=False)  # 24 positions: one context of 20 fits
    sched = Scheduler(blocks, max_batch=3, step_tokens=64)
    old, new = seq(8, max_new=12), seq(8, first=50, max_new=12)
    sched.add(old)
    sched.add(new)
    finished, preempted = [], False
    for _ in range(100):
        if not (sched.running or sched.waiting):
            break
        step(sched, finished)
        assert old in sched.running or old in finished  # the oldest is never the one to go
        if new in sched.waiting and len(new.tokens) > 8:
            preempted = True
            assert new.computed == 0 and new.blocks == []
    assert preempted and finished == [old, new]
    assert all(len(s.tokens) == 20 for s in finished) and blocks.used == 0


def test_a_shared_prompt_prefix_is_not_prefilled_twice():
    blocks = BlockManager(16, block_size=4)
    sched = Scheduler(blocks, max_batch=3, step_tokens=64)
    first = seq(10)
    sched.add(first)
    step(sched)  # two full blocks registered
    second = Sequence(first.tokens[:10] + [77, 78], 12, owner={"max_new": 2})
    sched.add(second)
    plan = dict((id(s), n) for s, n in step(sched))
    assert second.cached_tokens == 8 and plan[id(second)] == 4
    assert second.blocks[:2] == first.blocks[:2] and blocks.refs(first.blocks[0]) == 2
    again = Sequence(list(first.tokens[:8]), 8, owner={"max_new": 2})  # all cached: the last block still runs
    sched.add(again)
    step(sched)
    assert again.cached_tokens == 4
    for s in (first, second, again):
        sched.remove(s)
    assert blocks.used == 0 and blocks.cached > 0
