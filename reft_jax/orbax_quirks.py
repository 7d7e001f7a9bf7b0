"""Workarounds for two behaviours of Orbax (0.12) that reach our users as noise: each one is
narrow (one message, one thread's event loops) and says why it exists."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator


class UnrankedSaveNotice(logging.Filter):
    """Orbax logs 'Requested `tracked_metric`; did not provide metrics.' for every save without a
    metric when best-keeping is on. Ours are deliberate (a step that was not evaluated is kept as
    a latest step, never as best), so only that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


if not any(isinstance(f, UnrankedSaveNotice) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(UnrankedSaveNotice())


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop whose close() first waits for its unfinished tasks, as Orbax's own
    AsyncRunner.shutdown does."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = asyncio.all_tasks(self)
            if pending:  # return_exceptions: their errors are collected, not logged as unretrieved
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _DrainingPolicy(asyncio.AbstractEventLoopPolicy):
    """The policy in force before (`base`), except that threads inside `drained_orbax_loop`
    get _DrainingLoops from new_event_loop()."""

    def __init__(self, base: asyncio.AbstractEventLoopPolicy):
        self.base = base
        self.threads: dict[int, int] = {}  # thread id -> nesting depth

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        if threading.get_ident() in self.threads:
            return _DrainingLoop()
        return self.base.new_event_loop()

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        return self.base.get_event_loop()

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.base.set_event_loop(loop)

    def get_child_watcher(self):  # Python < 3.14
        return self.base.get_child_watcher()

    def set_child_watcher(self, watcher) -> None:
        self.base.set_child_watcher(watcher)


_policy_lock = threading.Lock()
_policy: _DrainingPolicy | None = None


@contextlib.contextmanager
def drained_orbax_loop() -> Iterator[None]:
    """Inside, an Orbax read lets everything it started finish before its event loop closes,
    even when one part of the read fails.

    Orbax (0.12) runs a restore as `loop.run_until_complete(asyncio.gather(*reads))` on a fresh
    loop and then closes that loop. When one array of a damaged step cannot be read, gather
    raises at once and the loop is closed with its sibling TensorStore reads still in flight;
    each of those, on finishing, calls `loop.call_soon_threadsafe` on the closed loop from a
    TensorStore thread, which prints a 'RuntimeError: Event loop is closed' traceback (one per
    read, often dozens) and leaves 'exception was never retrieved' errors to asyncio's log.
    Orbax makes that loop with `asyncio.new_event_loop()`, so while this thread is inside, its
    new loops wait for their remaining tasks on close(); other threads' loops are unchanged.
    Cost: a failed read takes as long as reading the whole step would."""
    global _policy
    me = threading.get_ident()
    with _policy_lock:
        if _policy is None or asyncio.get_event_loop_policy() is not _policy:
            _policy = _DrainingPolicy(asyncio.get_event_loop_policy())
            asyncio.set_event_loop_policy(_policy)
        policy = _policy
        policy.threads[me] = policy.threads.get(me, 0) + 1
    try:
        yield
    finally:
        with _policy_lock:
            policy.threads[me] -= 1
            if not policy.threads[me]:
                del policy.threads[me]
            if not policy.threads and asyncio.get_event_loop_policy() is policy:
                asyncio.set_event_loop_policy(policy.base)
                _policy = None
