"""The host->device link as one worker thread: expert loads run one at a time, demand first.

A real PCIe link moves one buffer at a time, so one worker models it. Loads a layer is waiting
for (demand) always start before speculative ones (prefetch); a queued prefetch can be
promoted when its layer comes to need it, or cancelled when a newer prediction drops it. The
loader also estimates when a load would finish, from the link's bandwidth (known for a
simulated link, measured from finished loads otherwise), for the compute-on-a-miss decision.

The worker runs its torch ops (reads from disk, copies) on one OpenMP thread. A second thread
that runs a parallel op keeps a second OpenMP team for the rest of the process, and with more
OpenMP threads than cores libgomp stops spinning at its barriers: every parallel region of the
compute thread then waits for its workers to wake, which made batch-1 CPU decode 1.5-2x slower.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

EMA_WEIGHT = 0.2  # weight of the newest load in the measured bandwidth: a few loads settle it


@dataclass(eq=False)
class _Job:
    run: Callable[[], None]
    nbytes: int
    future: Future = field(default_factory=Future)
    started: float | None = None  # perf_counter() when the worker took it


class LinkLoader:
    def __init__(self, bytes_per_s: float | None = None, name: str = "offload-rt-loader") -> None:
        self.bytes_per_s = bytes_per_s  # None until a load has been timed (a real link)
        self._known = bytes_per_s is not None  # a simulated link's bandwidth is exact
        self._demand: deque[_Job] = deque()
        self._spec: deque[_Job] = deque()
        self._running: _Job | None = None
        self._jobs: dict[Future, _Job] = {}
        self._cv = threading.Condition()
        self._closed = False
        started = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(started,), name=name, daemon=True)
        threads = torch.get_num_threads()
        self._thread.start()
        started.wait()
        torch.set_num_threads(threads)  # also the default of threads started later: give it back

    def submit(self, run: Callable[[], None], nbytes: int, urgent: bool) -> Future:
        """Queue a load of `nbytes`; urgent (a layer waits for it) goes before every prefetch."""
        job = _Job(run, nbytes)
        with self._cv:
            if self._closed:
                raise RuntimeError("the expert loader is closed")
            (self._demand if urgent else self._spec).append(job)
            self._jobs[job.future] = job
            self._cv.notify()
        return job.future

    def promote(self, future: Future) -> None:
        """A queued prefetch is now needed: move it behind the demand loads, before the rest."""
        with self._cv:
            job = self._jobs.get(future)
            if job is not None and job in self._spec:
                self._spec.remove(job)
                self._demand.append(job)

    def cancel(self, future: Future) -> bool:
        """Drop a load that has not started; False when it is running or done."""
        with self._cv:
            job = self._jobs.get(future)
            if job is None or not future.cancel():
                return False
            queue = self._spec if job in self._spec else self._demand
            queue.remove(job)
            del self._jobs[future]
            return True

    def eta(self, future: Future | None = None, nbytes: int = 0) -> float | None:
        """Seconds until `future` finishes (None: until a new urgent load of `nbytes` would,
        behind the running load and the demand queue); None while the bandwidth is unknown."""
        with self._cv:
            if self.bytes_per_s is None:
                return None
            if future is not None and future.done():
                return 0.0
            ahead = 0.0
            if self._running is not None:
                took = time.perf_counter() - (self._running.started or 0.0)
                ahead = max(0.0, self._running.nbytes / self.bytes_per_s - took)
                if self._running.future is future:
                    return ahead
            for job in (*self._demand, *(self._spec if future is not None else ())):
                ahead += job.nbytes / self.bytes_per_s
                if job.future is future:
                    return ahead
            if future is not None:
                return 0.0  # not queued here: already finished
            return ahead + nbytes / self.bytes_per_s

    def close(self) -> None:
        """Cancel queued loads, let the running one finish, stop the worker."""
        with self._cv:
            self._closed = True
            for job in (*self._demand, *self._spec):
                job.future.cancel()
            self._demand.clear()
            self._spec.clear()
            self._cv.notify()
        self._thread.join()

    def _next(self) -> _Job | None:
        with self._cv:
            while True:
                while not (self._closed or self._demand or self._spec):
                    self._cv.wait()
                if self._closed:
                    return None
                job = (self._demand or self._spec).popleft()
                if job.future.set_running_or_notify_cancel():
                    job.started = time.perf_counter()
                    self._running = job
                    return job
                self._jobs.pop(job.future, None)  # cancelled while queued

    def _work(self, started: threading.Event) -> None:
        torch.get_num_threads()  # torch's lazy per-thread setup first, or it would undo this
        torch.set_num_threads(1)  # this thread's OpenMP threads (see the module's docstring)
        started.set()
        while (job := self._next()) is not None:
            try:
                job.run()
            except BaseException as e:  # handed to whoever waits on the load
                self._finish(job)
                job.future.set_exception(e)
            else:
                self._finish(job)
                job.future.set_result(None)

    def _finish(self, job: _Job) -> None:
        took = time.perf_counter() - (job.started or 0.0)
        with self._cv:
            self._running = None
            self._jobs.pop(job.future, None)
            if not self._known and took > 0:
                rate = job.nbytes / took
                old = self.bytes_per_s
                self.bytes_per_s = rate if old is None else old + EMA_WEIGHT * (rate - old)
