"""The broker connection and channels, without aiormq's 10-frame hand-offs.

aiormq (under aio-pika) passes frames between its tasks through ``asyncio.Queue``
objects of at most 10 frames (``aiormq.Connection.FRAME_BUFFER_SIZE``): the connection's
one reader task hands each incoming frame to its channel's reader, and every channel's
outgoing frames go to the connection's one writer task. When a queue is full, the task
filling it waits until the task emptying it has had a turn on the event loop.

That bound holds nothing back that is not already bounded. The broker sends a channel at
most its prefetch of unacknowledged deliveries and only the confirms of publishes in
flight; a channel's reader does not wait for consumers (it starts a task per delivery),
and the writer hands each frame straight to the transport. So the only thing the bound
does is make one task wait for another's turn. On a worker whose event loop is busy with
turns, every 10 frames cost such a wait. A delivery is three frames, so the ingress
channel took in about three deliveries per wait. The prefetch window (256) then sat in
the socket instead of the submit queue, admission batches stayed small, and turns ran
with fewer inputs each. And while one channel's queue was full, the connection's reader
stopped for every channel, publisher confirms included.

Measured with ``lash-consumer bench`` (README, Performance) on the development machine,
over three interleaved pairs of 1,000 sessions x 5 inputs: one worker went from 575 to
677 inputs/s and two from 540 to 658, with 17% less whole-machine CPU per input at two.
Under Python 3.11 the mean admission batch of one worker went from 36 to 79 submits;
under Python 3.13 from 10 to 75, and its rate from 336 to 656-716 inputs/s.

:func:`connect` opens a robust connection with an unbounded outgoing queue, again after
each reconnect; :func:`open_channel` opens a channel with an unbounded incoming queue,
again after each reopen. (During a reconnect, until the callbacks have run, the queues
are bounded as aiormq made them: that costs speed, not correctness.) The benchmark's
baseline consumer and its own publisher and observer use the same helpers
(:func:`connect_plain` for their connections, which need no reconnects), so the
comparison stays like for like.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractRobustChannel,
    AbstractRobustConnection,
)


def unbound(queue: asyncio.Queue[Any]) -> None:
    """Lift ``queue``'s size limit in place.

    The queue must be changed in place, not replaced: the task that empties it is already
    waiting on it. ``asyncio.Queue`` keeps its limit in ``_maxsize`` (in every CPython
    version this project supports) and reads it on each ``put``.
    """
    queue._maxsize = 0  # type: ignore[attr-defined]  # see the docstring


def unbound_writes(connection: AbstractConnection) -> None:
    """Lift the limit of ``connection``'s outgoing frame queue (until it reconnects)."""
    transport = connection.transport
    if transport is not None:
        unbound(transport.connection.write_queue)


async def unbound_reads(channel: AbstractChannel) -> None:
    """Lift the limit of ``channel``'s incoming frame queue (until it reopens)."""
    underlay = await channel.get_underlay_channel()
    unbound(underlay.frames)


async def connect(url: str) -> AbstractRobustConnection:
    """A robust connection to ``url`` whose outgoing frames never wait on a full queue,
    also after it reconnects."""
    connection = await aio_pika.connect_robust(url)
    unbound_writes(connection)
    connection.reconnect_callbacks.add(lambda *_: unbound_writes(connection))
    return connection


async def connect_plain(url: str) -> AbstractConnection:
    """A connection without reconnects whose outgoing frames never wait on a full queue:
    for the benchmark's own connections (its publisher and observer, the baseline's
    processes), which must not be what limits the system they measure, and whose run fails
    with them anyway."""
    connection = await aio_pika.connect(url)
    unbound_writes(connection)
    return connection


async def open_channel(
    connection: AbstractConnection, *, publisher_confirms: bool = True
) -> AbstractChannel:
    """A channel of ``connection`` whose incoming frames never wait on a full queue, also
    after it reopens (a robust channel's ``reopen_callbacks``)."""
    channel = await connection.channel(publisher_confirms=publisher_confirms)
    await unbound_reads(channel)
    if isinstance(channel, AbstractRobustChannel):

        async def reopened(*_: object) -> None:
            await unbound_reads(channel)

        channel.reopen_callbacks.add(reopened)
    return channel
