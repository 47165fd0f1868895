"""Drive an `Engine` from a background thread and stream its outputs to asyncio callers.

The forward pass is long blocking work, so it never runs on the event loop.
Callers' adds and aborts are queued and applied by the engine thread between
steps; outputs travel back through `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from router.engine import Engine, RequestOutput
from router.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expertmesh-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, *,
                       request_id: str | None = None, tenant: str | None = None,
                       weight: float = 1.0) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Leaving the iteration early aborts it. `tenant` and
        its `weight` set its place in the waiting queue (weighted fair share across tenants)."""
        if self._stopped.is_set():
            raise EngineDeadError("the engine has shut down")
        self.engine.validate(prompt_token_ids, params)          # bad input fails here, in the caller
        request_id = request_id or f"areq-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request_id, list(prompt_token_ids), params, tenant, weight))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    @property
    def running(self) -> bool:
        """Whether the engine loop is alive (a replica's health check)."""
        return self._thread.is_alive() and not self._stopped.is_set()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout=30)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, tenant, weight = command
                try:
                    self.engine.add_request(prompt, params, request_id=request_id, tenant=tenant, weight=weight)
                except ValueError as error:
                    self._deliver(request_id, error)
            else:
                self.engine.abort(command[1])

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failed step fails the requests in it, not the server
                log.exception("engine step failed; failing all in-flight requests")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, EngineDeadError(f"engine step failed: {error}"))
                continue
            for output in outputs:
                self._deliver(output.request_id, output)
