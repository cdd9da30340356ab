"""Stopping background tasks: a cancellation swallowed on the way must not leave an owner waiting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

import pytest
from nats.aio.client import Client

from rjet._nats.denials import denials
from rjet._tasks import cancel_and_wait


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="CPython gh-86296 is fixed in 3.12")
async def test_python_3_11_wait_for_swallows_a_cancellation_that_meets_its_result() -> None:
    # What nats-py's requests await: the cause of an elastic group's stop hanging on its coordinator.
    answer = asyncio.get_running_loop().create_future()
    request = asyncio.create_task(asyncio.wait_for(answer, 5))
    await asyncio.sleep(0)
    answer.set_result("reply")
    request.cancel()
    assert await request == "reply"  # the cancellation is gone: a loop around it goes on


async def test_a_loop_that_swallows_its_cancellations_is_cancelled_until_it_ends() -> None:
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed < 3:  # as wait_for does on 3.11 when its future completes meanwhile
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task, None]), 5)
    assert task.cancelled()
    assert swallowed == 3


async def test_a_task_that_failed_before_is_stopped_without_raising() -> None:
    async def fail() -> None:
        raise ValueError("broken")

    async def sleep() -> None:
        await asyncio.sleep(10)

    failed, asleep = asyncio.create_task(fail()), asyncio.create_task(sleep())
    await asyncio.sleep(0)
    await cancel_and_wait([failed, asleep])
    assert isinstance(failed.exception(), ValueError)
    assert asleep.cancelled()


async def test_a_guarded_request_that_fails_after_its_caller_was_cancelled_is_not_left_unretrieved(
    nc: Client,
) -> None:
    """A request awaited under the permission guard (every JetStream call of rjet's) that swallows
    the cancellation of its caller, as nats-py's requests can on 3.11 (above), then fails (its
    connection closing): its error is retrieved, not reported as "Task exception was never
    retrieved" when the task is collected."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))

    async def request() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        raise ConnectionError("nats: connection closed")

    caller = asyncio.create_task(denials(nc).guard(lambda subject: None, request()))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.01)
    del caller
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert reported == []
