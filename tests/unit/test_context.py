from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest

from agentlat.operator.core import context

GUARD = 10.0  # seconds; only a guard against hangs, never a timing assumption


def _recorder(ctx: context.Context, log: list[str]) -> None:
    ctx.on_stop(lambda: log.append(f"stop {ctx.id()}"))
    ctx.on_kill(lambda: log.append(f"kill {ctx.id()}"))


def test_ids() -> None:
    assert context.Context("run-1").id() == "run-1"
    fresh = context.Context().id()
    assert len(fresh) == 32
    int(fresh, 16)
    parent = context.Context("p")
    assert [parent.child().id(), parent.child("irq").id(), parent.child().id()] == ["p/0", "p/irq", "p/1"]


def test_children_stop_then_kill_in_link_order() -> None:
    log: list[str] = []
    parent = context.Context("p")
    _recorder(parent, log)
    children = [context.Context(name) for name in ("a", "b", "c", "a1")]
    for child in children:
        _recorder(child, log)
    for child in children[:3]:
        parent.link_child(child)
    # Linked last, but through "a", so it hears the stop before "b" does.
    children[0].link_child(children[3])

    parent.stop()
    assert log == ["stop p", "stop a", "stop a1", "stop b", "stop c"]
    log.clear()
    parent.kill()
    assert log == ["kill p", "kill a", "kill a1", "kill b", "kill c"]


def test_kill_implies_stop() -> None:
    log: list[str] = []
    ctx = context.Context("k")
    _recorder(ctx, log)
    ctx.kill()
    assert ctx.is_stopped() and ctx.is_killed()
    assert ctx.wait_stopped(0) and ctx.wait_killed(0)
    assert log == ["stop k", "kill k"]


def test_stop_is_not_kill_and_checkpoint_raises_only_after_kill() -> None:
    ctx = context.Context("s")
    ctx.stop_generating()
    assert ctx.is_stopped() and not ctx.is_killed()
    assert not ctx.wait_killed(0)
    ctx.checkpoint()
    ctx.kill()
    with pytest.raises(context.Killed, match="context s was killed"):
        ctx.checkpoint()


def test_stop_and_kill_are_idempotent_across_threads() -> None:
    log: list[str] = []
    ctx = context.Context("i")
    _recorder(ctx, log)
    ctx.link_child(child := context.Context("c"))
    _recorder(child, log)
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        ctx.stop()
        ctx.kill()
        ctx.stop()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GUARD)
    assert sorted(log) == ["kill c", "kill i", "stop c", "stop i"]


def test_linking_to_a_stopped_parent_stops_the_child_at_once() -> None:
    parent = context.Context()
    parent.stop()
    child = parent.child()
    assert child.is_stopped() and not child.is_killed()

    parent.kill()
    assert child.is_killed()
    late = context.Context()
    parent.link_child(late)
    assert late.is_killed() and late.is_stopped()


def test_callbacks_registered_after_the_fact_run_now() -> None:
    log: list[str] = []
    ctx = context.Context("late")
    ctx.stop()
    _recorder(ctx, log)
    assert log == ["stop late"]


def test_a_failing_callback_does_not_block_the_stop(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    ctx = context.Context()
    ctx.on_stop(boom)
    child = ctx.child()
    with caplog.at_level(logging.ERROR, logger=context.__name__):
        ctx.stop()
    assert child.is_stopped()
    assert "boom" in caplog.text


def test_thread_side_waits() -> None:
    ctx = context.Context()
    assert not ctx.wait_stopped(0)
    results: list[bool] = []
    waiters = [
        threading.Thread(target=lambda: results.append(ctx.wait_stopped(GUARD))),
        threading.Thread(target=lambda: results.append(ctx.wait_killed(GUARD))),
    ]
    for thread in waiters:
        thread.start()
    ctx.kill()
    for thread in waiters:
        thread.join(GUARD)
    assert results == [True, True]


async def _registered(coro_task: asyncio.Task[None]) -> asyncio.Task[None]:
    await asyncio.sleep(0)  # one scheduling step: the task runs up to its await on the context
    assert not coro_task.done()
    return coro_task


async def test_stop_from_another_thread_wakes_waiters_in_every_loop() -> None:
    ctx = context.Context()
    here = await _registered(asyncio.create_task(ctx.stopped()))

    other_loop_registered = threading.Event()
    other_loop_result: list[str] = []

    async def wait_in_other_loop() -> None:
        task = await _registered(asyncio.create_task(ctx.stopped()))
        other_loop_registered.set()
        await task
        other_loop_result.append("woken")

    other = threading.Thread(target=asyncio.run, args=(wait_in_other_loop(),), daemon=True)
    other.start()
    assert await asyncio.to_thread(other_loop_registered.wait, GUARD)

    stopper = threading.Thread(target=ctx.stop)
    stopper.start()
    await asyncio.wait_for(here, GUARD)
    await asyncio.to_thread(other.join, GUARD)
    stopper.join(GUARD)
    assert other_loop_result == ["woken"]


async def test_killed_waits_for_kill_not_stop() -> None:
    ctx = context.Context()
    killed = await _registered(asyncio.create_task(ctx.killed()))
    stopped = await _registered(asyncio.create_task(ctx.stopped()))
    ctx.stop()
    await asyncio.wait_for(stopped, GUARD)
    assert not killed.done()
    ctx.kill()
    await asyncio.wait_for(killed, GUARD)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_async_killed_or_stopped_returns_on_either(how: str) -> None:
    ctx = context.Context()
    either = await _registered(asyncio.create_task(ctx.async_killed_or_stopped()))
    await asyncio.to_thread(getattr(ctx, how))
    await asyncio.wait_for(either, GUARD)
    await asyncio.wait_for(ctx.async_killed_or_stopped(), GUARD)  # already done: returns at once


async def test_cancelled_waiter_leaves_the_context_usable() -> None:
    ctx = context.Context()
    abandoned = await _registered(asyncio.create_task(ctx.stopped()))
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    waiting = await _registered(asyncio.create_task(ctx.stopped()))
    ctx.stop()
    await asyncio.wait_for(waiting, GUARD)


def test_stop_ignores_waiters_of_a_closed_loop() -> None:
    ctx = context.Context()
    loop = asyncio.new_event_loop()
    task = loop.create_task(ctx.stopped())
    loop.run_until_complete(asyncio.sleep(0))
    assert not task.done()
    loop.close()
    ctx.stop()
    assert ctx.is_stopped()
    loop.set_exception_handler(lambda _loop, _context: None)  # silence "Task was destroyed but pending"
    del task
    gc.collect()
