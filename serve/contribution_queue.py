"""Writes of the experiential KB (contributions, deletions) queued per tenant and run by a bounded pool of workers.

Why not a lock: one lock per replica covered the segmentation and embedding of every contribution and deletion,
so four parallel 2,000-step trajectories of one tenant made another tenant's 2-step contribution wait 120 s and
get 504, and the work behind that 504 was stored anyway (issue 40).

What :class:`ContributionQueue` guarantees (plain threads, no Ray; the service holds one per ingress replica):

- **A tenant's jobs run one at a time, in arrival order.** The check and the write of one episode never interleave
  with another write of the same tenant, with no lock held across segmentation or embedding. Stored episode ids
  are scoped by tenant (:func:`knowmap.tenancy.scoped`), so jobs of two tenants never touch the same episode and
  may run side by side.
- **At most ``workers`` jobs run at once**; a free worker takes the oldest job of the next tenant in turn
  (round-robin over the tenants that have work waiting and none running). With ``workers >= 2`` one busy tenant
  never holds every worker: another tenant's job starts at once. With more busy tenants than workers, a tenant
  waits for at most one running job to end.
- **Bounded, with backpressure.** A tenant holds at most ``per_tenant`` jobs (waiting or running), the pool at most
  ``total``; one more is refused at once with :class:`~knowmap.errors.ContributionQueueFullError`, whose
  ``retry_after_s`` estimates when a slot frees: the recent duration of the tenant's jobs, and at least how long its
  running one has run so far (a first 2,000-step job answered "1 s" for a minute had a client resend its 3.7 MB
  body 186 times); when the pool is full, the recent duration of anyone's over the workers.
- **A deadline that cancels, never a write after it.** A job's work calls :meth:`Ticket.begin_write` before it
  stores anything; past the job's deadline, or once :meth:`ContributionQueue.cancel` took it back (its request was
  answered 504), that raises :class:`~knowmap.errors.ContributionTimeoutError` and nothing is stored. A job still
  waiting is dropped at once and its slot freed. Once its write has begun, a job runs to its end and ``cancel``
  returns False: the caller waits for the outcome and reports it, so a 504 always means "not stored".
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

from knowmap.errors import ContributionQueueFullError, ContributionTimeoutError

State = Literal["waiting", "running", "writing", "cancelled", "done"]
_SMOOTHING = 0.3  # weight of the newest job in the running mean of job durations (the Retry-After estimate)


class Ticket:
    """One queued job: its tenant, deadline, state and the future its result (or exception) arrives in."""

    def __init__(self, tenant: str, work: Callable[[Ticket], Any], deadline: float,
                 clock: Callable[[], float]) -> None:
        self.tenant, self.work, self.deadline, self._clock = tenant, work, deadline, clock
        self.future: Future[Any] = Future()
        self.state: State = "waiting"
        self._lock = threading.Lock()

    def remaining_s(self) -> float:
        """Seconds until the deadline (0 once it has passed)."""
        return max(0.0, self.deadline - self._clock())

    def begin_write(self) -> None:
        """Called by the work right before it stores anything: from here on the job is no longer cancelled.

        Raises:
            ContributionTimeoutError: the job was cancelled or its deadline has passed; the work must store nothing.
        """
        with self._lock:
            if self.state == "running" and self._clock() <= self.deadline:
                self.state = "writing"
                return
            self.state = "cancelled"
        raise ContributionTimeoutError("its write was not begun within its deadline, or its request was answered; "
                                       "nothing was stored")

    def _take_back(self) -> bool:
        """Cancel unless the write has begun (or the job ended); True if the job will store nothing."""
        with self._lock:
            if self.state in ("waiting", "running"):
                self.state = "cancelled"
            return self.state == "cancelled"


class ContributionQueue:
    """Per-tenant queues of write jobs served by ``workers`` threads (see the module docstring).

    Args:
        workers: jobs that may run at once (threads); >= 1.
        per_tenant: jobs one tenant may hold, waiting or running; >= 1.
        total: jobs the queue may hold in all; >= ``per_tenant``.
        clock: monotonic seconds (a test passes its own).

    Raises:
        ValueError: a bound out of range.
    """

    def __init__(self, workers: int, per_tenant: int, total: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if workers < 1 or per_tenant < 1 or total < per_tenant:
            raise ValueError(f"need workers >= 1, per_tenant >= 1 and total >= per_tenant; got workers={workers}, "
                             f"per_tenant={per_tenant}, total={total}")
        self.workers, self.per_tenant, self.total = workers, per_tenant, total
        self._clock = clock
        self._ready = threading.Condition()
        self._lanes: OrderedDict[str, deque[Ticket]] = OrderedDict()  # tenants with jobs waiting, in turn order
        self._running: set[str] = set()
        self._held: dict[str, int] = {}  # tenant -> jobs waiting or running
        self._seconds: dict[str, float] = {}  # tenant -> running mean of its jobs' durations
        self._since: dict[str, float] = {}  # tenant -> when its running job started
        self._mean_s = 1.0  # of every tenant's jobs
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"contribution-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, tenant: str, work: Callable[[Ticket], Any], timeout_s: float) -> Ticket:
        """Queue ``work(ticket)`` in the tenant's lane, to begin its write within ``timeout_s``.

        Returns:
            the job's ticket; ``ticket.future`` gets the work's result or exception.

        Raises:
            ContributionQueueFullError: the tenant (or the whole queue) holds as many jobs as allowed.
        """
        with self._ready:
            if self._closed:
                raise RuntimeError("the contribution queue is closed")
            held, pooled = self._held.get(tenant, 0), sum(self._held.values())
            if held >= self.per_tenant:
                running_for = self._clock() - self._since.get(tenant, self._clock())
                retry = max(self._seconds.get(tenant, self._mean_s), running_for)
                raise ContributionQueueFullError(
                    f"{held} writes of this tenant are queued or running, the most serve.contribution_queue_per_"
                    f"tenant ({self.per_tenant}) allows; retry after the Retry-After seconds", _seconds(retry))
            if pooled >= self.total:
                raise ContributionQueueFullError(
                    f"{pooled} writes are queued or running in all, the most serve.contribution_queue_total "
                    f"({self.total}) allows; retry after the Retry-After seconds",
                    _seconds(self._mean_s / self.workers))
            ticket = Ticket(tenant, work, self._clock() + timeout_s, self._clock)
            self._held[tenant] = held + 1
            self._lanes.setdefault(tenant, deque()).append(ticket)
            self._ready.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Take a job back (its request was answered): a waiting one is dropped and its slot freed, a running one
        stores nothing (:meth:`Ticket.begin_write` refuses). Returns False if its write has begun or it ended:
        then its outcome stands and the caller should wait for it."""
        if not ticket._take_back():
            return False
        with self._ready:
            lane = self._lanes.get(ticket.tenant)
            if lane is not None and ticket in lane:
                lane.remove(ticket)
                if not lane:
                    del self._lanes[ticket.tenant]
                self._release(ticket.tenant)
                _settle(ticket.future, error=ContributionTimeoutError("cancelled before it began; nothing stored"))
        return True

    def stats(self) -> dict[str, Any]:
        """``{"running": n, "waiting": n, "by_tenant": {tenant: held}}``."""
        with self._ready:
            return {"running": len(self._running), "waiting": sum(len(lane) for lane in self._lanes.values()),
                    "by_tenant": dict(self._held)}

    def close(self) -> None:
        """Stop the workers once the jobs already running end; waiting jobs fail."""
        with self._ready:
            self._closed = True
            for lane in self._lanes.values():
                for ticket in lane:
                    _settle(ticket.future, error=ContributionTimeoutError("the service is stopping; nothing stored"))
            self._lanes.clear()
            self._ready.notify_all()

    # -- workers -----------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._ready:
                ticket = self._next()
                while ticket is None:
                    if self._closed:
                        return
                    self._ready.wait()
                    ticket = self._next()
            self._run(ticket)

    def _next(self) -> Ticket | None:
        """The oldest job of the first tenant in turn that has none running; that tenant goes to the back."""
        for tenant, lane in self._lanes.items():
            if tenant in self._running:
                continue
            ticket = lane.popleft()
            if lane:
                self._lanes.move_to_end(tenant)
            else:
                del self._lanes[tenant]
            self._running.add(tenant)
            self._since[tenant] = self._clock()
            return ticket
        return None

    def _run(self, ticket: Ticket) -> None:
        started = self._clock()
        try:
            with ticket._lock:
                ticket.state = "running" if ticket.state == "waiting" and started <= ticket.deadline else "cancelled"
            if ticket.state == "cancelled":
                raise ContributionTimeoutError("its deadline passed while it waited for its turn; nothing stored")
            result = ticket.work(ticket)
        except Exception as e:  # noqa: BLE001 - the job's error is its caller's answer
            _settle(ticket.future, error=e)
        else:
            _settle(ticket.future, result=result)
        finally:
            with self._ready:
                if ticket.state != "cancelled":
                    ticket.state = "done"
                seconds = self._clock() - started
                previous = self._seconds.get(ticket.tenant, seconds)
                self._seconds[ticket.tenant] = (1 - _SMOOTHING) * previous + _SMOOTHING * seconds
                self._mean_s = (1 - _SMOOTHING) * self._mean_s + _SMOOTHING * seconds
                self._running.discard(ticket.tenant)
                self._since.pop(ticket.tenant, None)
                self._release(ticket.tenant)
                self._ready.notify_all()

    def _release(self, tenant: str) -> None:
        self._held[tenant] -= 1
        if not self._held[tenant]:
            del self._held[tenant]


def _seconds(estimate: float) -> int:
    """A Retry-After value: whole seconds, 1 to 300."""
    return int(min(300, max(1, math.ceil(estimate))))


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
