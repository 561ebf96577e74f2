"""The closer: one thread that closes every descriptor a caller handed us.

Why a thread. close() of the last reference to a file can wait for as long
as someone else decides:

* a TCP socket with SO_LINGER on and unsent data waits for the data to leave,
  up to the linger time (inet_release → tcp_close → sk_stream_wait_close).
  Switching SO_LINGER off first is not enough: the caller may still hold
  the socket (through another process, or a Unix socket queued inside the
  batch) and switch it on again between our setsockopt() and our close();
  and a Unix socket in a batch, or a client's connection itself, releases
  the descriptors still queued on it when it goes away (unix_release_sock →
  skb purge → fput), in the task that dropped the last reference, and those
  can linger too;
* a file on a FUSE mount calls the filesystem's flush on every close()
  (filp_close → f_op->flush) and waits for the FUSE server's answer, which
  any local user may run and never answer.

The helper's socket is 0666, so any local user can hand it such a
descriptor, even one refused at accept (a refused caller's queued messages
are released when we close its connection). So the serving loop never
closes a descriptor a caller gave it, nor a client's connection: it hands
them here. One exception: a batch just put in repair mode is closed by the
loop before it replies (every descriptor is then a TCP socket in repair
mode, whose close cannot wait), because the caller may count on the socket
being gone once its own copy is (a same-host migration target connect()s
the same 4-tuple). This thread switches SO_LINGER off on each (sockets only; errors
ignored: it is only a shortcut for the common case) and closes them, a
batch at a time, with one close_range(2) when the kernel installed the batch
as a contiguous range. If a close() blocks, only this thread waits; the
loop goes on serving. FUSE is not tested (no FUSE where the tests run): the
blocking close() it causes is the same as a lingering socket's, which the
tests cover.

The thread is started after the capabilities are dropped (it inherits
CAP_NET_ADMIN alone; capset() changes only the calling thread's) and before
the seccomp filter is installed (sandbox.py, which applies the filter to
every thread, this one included); what it calls afterwards (futex,
getsockname, setsockopt SO_LINGER, close, close_range, write for a log
line) is on the allow-list.

Bounded: if more than :data:`MAX_BACKLOG` descriptors wait here (this
thread is stuck in a close()), the loop stops accepting and reading
(server.py) until the backlog is back under the bound, so a caller that
blocks the closer cannot make the helper pile up descriptors until its
table is full. A connection counts as one: the messages still queued on it
are not read out (their descriptors never enter our table); closing the
connection here releases them, in this thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Sequence

from ferry_repair.protocol import SCM_MAX_FD, close_fds, linger_off_all

log = logging.getLogger("ferry-repair")

#: Descriptors that may wait for the closer before the loop stops accepting
#: and reading: four full batches, what four ferryds migrating at once (the
#: most a node runs) hand over in one round of the loop. Far below any
#: descriptor limit (the helper raises its soft limit to the hard one).
MAX_BACKLOG = 4 * SCM_MAX_FD


class Closer:
    """Closes descriptors in a thread of its own, in the order they were handed over."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, ...]] = queue.SimpleQueue()
        # One writer each (the loop, the thread); reading an int needs no lock.
        self._queued = 0
        self._closed = 0
        self._thread = threading.Thread(target=self._run, name="closer", daemon=True)

    def start(self) -> None:
        """Start the thread: after dropping capabilities, before the seccomp filter."""
        self._thread.start()

    def close_later(self, fds: Sequence[int]) -> None:
        """Hand over descriptors we own; the caller must not use them any more.

        (A batch just put in repair mode is not handed here: the loop closes
        it itself before replying, see ferry_repair.server.)
        """
        if fds:
            self._queued += len(fds)
            self._queue.put(tuple(fds))

    @property
    def closed(self) -> int:
        """Descriptors closed so far (grows: descriptors were freed)."""
        return self._closed

    @property
    def backlog(self) -> int:
        """Descriptors handed over and not closed yet."""
        return self._queued - self._closed

    def _run(self) -> None:
        while True:
            fds = self._queue.get()
            try:
                linger_off_all(fds)
                close_batch(fds)
            except Exception:  # a bug; the descriptors must still go, and the thread live
                log.exception("internal error while closing descriptors")
                close_fds(fds)
            self._closed += len(fds)


def close_batch(fds: Sequence[int]) -> None:
    """Close descriptors we own: one close_range(2) if they are a contiguous range."""
    low, high = min(fds), max(fds)
    if high - low + 1 == len(fds) == len(set(fds)):
        os.closerange(low, high + 1)
    else:
        close_fds(fds)
