"""Frames live in a ContextVar: threads and asyncio tasks never share state."""

from __future__ import annotations

import asyncio
import threading
import time

import jax.numpy as jnp
import pytest
from helpers import make_counter

import lift

THREADS = 8
CALLS = 200


def _slow_tick(tree, by):
    """Read, yield the GIL, then write: a race if frames were shared."""
    old = lift.get(tree["n"])
    time.sleep(0)
    lift.set(tree["n"], old + by)
    return old


def _run_threads(make_step):
    """Run ``THREADS`` threads of ``CALLS`` calls each; return (finals, errors)."""
    tree, _ = make_counter()
    step = make_step(tree)
    finals: dict[int, int] = {}
    seen_wrong: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def worker(i):
        try:
            _, state = make_counter(1000 * i)
            by = jnp.asarray(i + 1, jnp.int32)
            barrier.wait()
            for call in range(CALLS):
                old, state = step(state, by)
                if int(old) != 1000 * i + call * (i + 1):
                    seen_wrong.setdefault(i, []).append((call, int(old)))
            finals[i] = int(state[tree["n"]])
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return finals, seen_wrong, errors


def _eager(tree):
    return lift.stateful(lambda by: _slow_tick(tree, by))


def _jit_top_level(tree):
    return lift.jit(lift.stateful(lambda by: _slow_tick(tree, by)))


def _jit_inside_frame(tree):
    jitted = lift.jit(lambda by: _slow_tick(tree, by))

    def step(by):
        old = jitted(by)
        time.sleep(0)
        return old

    return lift.stateful(step)


@pytest.mark.parametrize(
    "make_step", [_eager, _jit_top_level, _jit_inside_frame], ids=lambda f: f.__name__
)
def test_threads_do_not_see_each_others_state(make_step):
    finals, seen_wrong, errors = _run_threads(make_step)
    assert not errors, errors
    assert seen_wrong == {}
    assert finals == {i: 1000 * i + CALLS * (i + 1) for i in range(THREADS)}


def test_a_thread_does_not_inherit_the_frame_of_its_creator():
    tree, state = make_counter(5)
    seen = []

    def child():
        try:
            lift.get(tree["n"])
        except lift.FrameError as err:
            seen.append(err)

    def step():
        t = threading.Thread(target=child)
        t.start()
        t.join()
        return lift.get(tree["n"])

    out, _ = lift.stateful(step)(state)
    assert int(out) == 5
    assert len(seen) == 1


# ----------------------------------------------------------------------- asyncio


async def _count(tree, steps):
    """Runs inside the frame it was created in; awaits between read and write."""
    reads = []
    for _ in range(steps):
        old = lift.get(tree["n"])
        await asyncio.sleep(0)
        lift.set(tree["n"], old + 1)
        reads.append(int(old))
    return reads


def test_asyncio_tasks_inside_frames_see_only_their_own_state():
    tree, _ = make_counter()
    steps = 20

    async def main():
        tasks = []
        for start in (0, 100):
            _, state = make_counter(start)
            # A task copies the current context: this one runs in this frame.
            (task, _) = lift.stateful(
                lambda: asyncio.get_running_loop().create_task(_count(tree, steps))
            )(state)
            tasks.append(task)
        return await asyncio.gather(*tasks)

    reads_a, reads_b = asyncio.run(main())
    assert reads_a == list(range(steps))
    assert reads_b == list(range(100, 100 + steps))


def test_asyncio_tasks_interleaving_stateful_calls():
    tree, _ = make_counter()
    step = lift.stateful(lambda by: _slow_tick(tree, by))
    order = []

    async def worker(name, start, by, calls):
        _, state = make_counter(start)
        for _ in range(calls):
            _, state = step(state, jnp.asarray(by, jnp.int32))
            order.append(name)
            await asyncio.sleep(0)
            with pytest.raises(lift.FrameError):  # no frame leaks between calls
                lift.get(tree["n"])
        return int(state[tree["n"]])

    async def main():
        return await asyncio.gather(worker("a", 0, 1, 30), worker("b", 1000, 7, 30))

    assert asyncio.run(main()) == [30, 1000 + 7 * 30]
    assert order[:4] == ["a", "b", "a", "b"]  # the tasks really interleaved
