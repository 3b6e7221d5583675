"""The request pump shared by both APIs' bidirectional streams, with backpressure.

A stream's requests are read by a reader task of their own; each is handed to the adapter's
``handle`` coroutine, which answers it with :meth:`RequestPump.reply` (or :meth:`RequestPump.fail`)
at once or, for a chunk, from its future's done callback: the reader then goes straight back to
reading, and a chunk costs one step of each task (the reader's and the generator's), as a plain
handler that awaited its chunk would. The stream's handler generator yields the replies in the order
they are given. The reader stops reading while more than ``window`` requests are unanswered,
counting a reply as answered once the generator has taken it for gRPC to send: a client that stops
reading its replies is, soon after, not read either, so what the server holds per stream stays
bounded (``window`` + 1 requests and replies, plus gRPC's flow-control buffers).

Concurrency: all on the event loop thread. The generator waits on one future, resolved by
:meth:`reply`, :meth:`finish` (a final message, e.g. the session's end notice) or the reader's
end; nothing cancels the handler's own task. When the generator stops (the client left, or a
final message was sent), it cancels the reader task: chunks already submitted still apply.

A request that did not parse arrives as an :class:`~service.api.handlers.Unparsed` marker and never
reaches ``handle``: the pump sends its in-band reply where it carries one (KServe), else the stream
fails with its INVALID_ARGUMENT (native).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar, cast

from service.api.handlers import Unparsed

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class RequestPump(Generic[Request, Reply]):
    """Reads one stream's requests, pausing while over ``window`` are unanswered, and hands out
    its replies."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._replies: collections.deque[Reply] = collections.deque()
        self._unanswered = 0  # read, and their reply not yet taken by the generator
        self._input_done = False
        self._final: Reply | None = None  # sent last, then the stream ends
        self._error: BaseException | None = None  # the reader's failure, raised in the generator
        self._reply_waiter: asyncio.Future[None] | None = None
        self._room_waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # built by a handler, on the serving loop

    def reply(self, reply: Reply) -> None:
        """Answer one request (loop thread; from anywhere: a handler or a done callback)."""
        self._replies.append(reply)
        self._wake_generator()

    def fail(self, error: BaseException) -> None:
        """Answer one request with ``error``, which ends the stream once the replies given
        before it are sent (the native API's way: a failed request fails its stream)."""
        self._unanswered -= 1
        if self._error is None:
            self._error = error
        self._wake_generator()

    def finish(self, final: Reply) -> None:
        """Send ``final`` after the replies already given, then end the stream."""
        self._final = final
        self._wake_generator()

    def _answer_unparsed(self, request: Unparsed) -> None:
        """Answer a request that did not parse: its in-band reply, else its error (which ends
        the stream, as a failed request of the native API does)."""
        if request.reply is None:
            raise request.error()
        self.reply(cast(Reply, request.reply))

    def _wake_generator(self) -> None:
        waiter = self._reply_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def replies(
        self, requests: AsyncIterable[Request], handle: Callable[[Request], Awaitable[None]]
    ) -> AsyncIterator[Reply]:
        """Run the reader over ``requests`` and yield replies until the stream is done."""
        reader = asyncio.create_task(self._read(requests, handle), name="stream-reader")
        try:
            while True:
                if self._replies:
                    self._unanswered -= 1
                    room = self._room_waiter
                    if room is not None and not room.done():
                        room.set_result(None)
                    yield self._replies.popleft()
                elif self._final is not None:
                    yield self._final
                    return
                elif self._error is not None and not self._unanswered:
                    raise self._error  # after every reply given before it
                elif self._input_done and not self._unanswered:  # every request answered
                    return
                else:
                    self._reply_waiter = self._loop.create_future()
                    try:
                        await self._reply_waiter
                    finally:
                        self._reply_waiter = None
        finally:
            reader.cancel()

    async def _read(
        self, requests: AsyncIterable[Request], handle: Callable[[Request], Awaitable[None]]
    ) -> None:
        try:
            async for request in requests:
                self._unanswered += 1
                try:
                    if isinstance(request, Unparsed):
                        self._answer_unparsed(request)
                    else:
                        await handle(request)
                except BaseException:
                    self._unanswered -= 1  # answered by the error, which ends the stream
                    raise
                while self._unanswered > self.window and self._final is None:
                    self._room_waiter = self._loop.create_future()
                    try:
                        await self._room_waiter
                    finally:
                        self._room_waiter = None
                if self._final is not None:
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a handler's error, or the read failed: end the stream
            if self._error is None:
                self._error = error  # raised once the requests already handed on are answered
        finally:
            self._input_done = True
            self._wake_generator()
