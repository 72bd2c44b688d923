"""The decode step's thread count: all threads while they run at speed, one while they wait on
each other, back to all when the machine frees up. (The same logits either way:
tests/test_generation_compiled.py.)"""

from __future__ import annotations

import torch

from fusionlm.inference.threads import PROBE_EVERY, ThreadPlanner


def run(planner: ThreadPlanner, seconds: dict[int, float], steps: int) -> list[int]:
    """``steps`` steps whose time depends on the thread count; the counts chosen."""
    chosen = []
    for _ in range(steps):
        threads = planner.next_threads()
        planner.record(threads, seconds[threads])
        chosen.append(threads)
    return chosen


def test_an_idle_machine_never_tries_one_thread():
    planner = ThreadPlanner(2)
    assert run(planner, {2: 0.010, 1: 0.015}, 200) == [2] * 200


def test_shared_cores_move_to_one_thread_and_back_when_they_free_up():
    planner = ThreadPlanner(2)
    run(planner, {2: 0.010, 1: 0.015}, 10)
    contended = run(planner, {2: 0.040, 1: 0.016}, 3 * PROBE_EVERY)
    assert contended.count(1) > 2 * PROBE_EVERY  # switched within a few steps
    assert contended[-PROBE_EVERY:].count(2) == 1  # all threads tried once per period
    freed = run(planner, {2: 0.010, 1: 0.015}, 2 * PROBE_EVERY)
    assert freed[-PROBE_EVERY:] == [2] * PROBE_EVERY


def test_one_thread_is_not_chosen_when_it_is_slower_still():
    planner = ThreadPlanner(2)
    run(planner, {2: 0.010, 1: 0.015}, 10)
    # a trial when the slowdown starts, then one per period
    assert run(planner, {2: 0.020, 1: 0.030}, 3 * PROBE_EVERY).count(1) <= 1 + 3


def test_a_single_thread_setting_stays_single():
    assert run(ThreadPlanner(1), {1: 0.01}, 10) == [1] * 10


def test_the_step_restores_torchs_setting():
    threads = torch.get_num_threads()
    planner = ThreadPlanner(2)
    planner.mean_s, planner.fastest_s, planner.steps = {2: 0.05, 1: 0.01}, 0.01, 1
    with planner.step() as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
