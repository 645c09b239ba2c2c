"""Frames live in a ContextVar: threads and asyncio tasks never share state."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import jax.numpy as jnp
import pytest
from helpers import make_counter, tick
from jax import lax

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


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_concurrent_first_calls_writing_state_in_a_raw_loop(jitted):
    """8 threads x 5 rounds, each round a new function called first by all threads."""
    tree, _ = make_counter()
    errors: list[BaseException] = []
    results: dict[tuple[int, int], tuple[int, int, int]] = {}

    def make_step():
        def step(xs):
            def body(c, x):
                old = lift.get(tree["n"])
                time.sleep(0)
                lift.set(tree["n"], old + x)
                return c + 1, old

            count, olds = lax.scan(body, jnp.int32(0), xs)
            return count, olds[-1]

        f = lift.stateful(step)
        return lift.jit(f) if jitted else f

    for round_ in range(5):
        step = make_step()
        barrier = threading.Barrier(THREADS)

        def worker(i, step=step, round_=round_, barrier=barrier):
            try:
                _, state = make_counter(100 * i)
                xs = jnp.full(4, i + 1, jnp.int32)
                barrier.wait()
                (count, last_old), new = step(state, xs)
                results[round_, i] = (int(count), int(last_old), int(new[tree["n"]]))
            except BaseException as err:  # reported by the main thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert len(results) == 5 * THREADS
    for (_, i), (count, last_old, final) in results.items():
        assert (count, last_old, final) == (
            4,
            100 * i + 3 * (i + 1),
            100 * i + 4 * (i + 1),
        )


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
    """Awaits between read and write; uses whatever frame its context holds."""
    reads = []
    for _ in range(steps):
        old = lift.get(tree["n"])
        await asyncio.sleep(0)
        lift.set(tree["n"], old + 1)
        reads.append(int(old))
    return reads


def test_asyncio_task_created_inside_a_frame_cannot_use_it_after_it_returns():
    tree, state = make_counter(100)

    async def main():
        # The task copies the context, frame included, but runs after the call.
        (task, new) = lift.stateful(
            lambda: asyncio.get_running_loop().create_task(_count(tree, 3))
        )(state)
        with pytest.raises(lift.FrameError) as info:
            await task
        return new, info.value

    new, err = asyncio.run(main())
    msg = str(err)
    assert "['n']" in msg
    assert "has returned" in msg
    assert "lift.stateful" in msg
    assert int(new[tree["n"]]) == 100  # the returned dict was never written


def test_asyncio_tasks_created_inside_frames_run_their_own_frames_concurrently():
    tree, _ = make_counter()
    step = lift.stateful(lambda by: _slow_tick(tree, by))
    steps = 20

    async def worker(start, by):
        _, state = make_counter(start)
        reads = []
        for _ in range(steps):
            old, state = step(state, jnp.asarray(by, jnp.int32))
            reads.append(int(old))
            await asyncio.sleep(0)
        return reads, int(state[tree["n"]])

    async def main():
        tasks = []
        for start, by in ((0, 1), (100, 2), (1000, 3)):
            _, outer = make_counter(-1)
            # created inside a stateful call: the copied context holds its frame,
            # which closes before the task runs; the task's own calls make new frames
            task, outer_new = lift.stateful(
                lambda start=start, by=by: asyncio.get_running_loop().create_task(
                    worker(start, by)
                )
            )(outer)
            assert outer_new == outer
            tasks.append(task)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for (reads, final), (start, by) in zip(
        results, ((0, 1), (100, 2), (1000, 3)), strict=True
    ):
        assert reads == [start + by * i for i in range(steps)]
        assert final == start + by * steps


def test_copied_context_cannot_read_or_write_a_returned_frame():
    tree, state = make_counter(7)
    contexts = []

    def step():
        contexts.append(contextvars.copy_context())
        return tick(tree)

    _, new = lift.stateful(step)(state)
    for what, call in (
        ("get", lambda: lift.get(tree["n"])),
        ("set", lambda: lift.set(tree["n"], jnp.asarray(1, jnp.int32))),
    ):
        with pytest.raises(lift.FrameError, match=r"\['n'\]") as info:
            contexts[0].run(call)
        assert f"lift.{what}(" in str(info.value)
        assert "has returned" in str(info.value)
    assert int(new[tree["n"]]) == 8
    assert int(state[tree["n"]]) == 7


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
