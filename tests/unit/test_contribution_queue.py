"""The write queue of the retrieval service (knowmap.serve.contribution_queue), without Ray: a tenant's writes one
at a time and in order, another tenant's beside them (never behind), bounded per tenant and in all (a full queue
is refused at once with a Retry-After estimate), and a deadline or a cancellation that stores nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from knowmap.errors import ContributionQueueFullError, ContributionTimeoutError
from knowmap.serve.contribution_queue import ContributionQueue, Ticket

WAIT = 5.0  # seconds any test waits for a thread at most


@pytest.fixture
def queue() -> Iterator[ContributionQueue]:
    q = ContributionQueue(workers=2, per_tenant=3, total=5)
    yield q
    q.close()


class Job:
    """A write that blocks until released; records when it ran and whether it stored."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.started, self.release = threading.Event(), threading.Event()
        self.stored = False

    def __call__(self, ticket: Ticket) -> str:
        self.log.append(f"start {self.name}")
        self.started.set()
        assert self.release.wait(WAIT)
        ticket.begin_write()
        self.stored = True
        self.log.append(f"end {self.name}")
        return self.name


def _jobs(names: str, log: list[str]) -> dict[str, Job]:
    return {n: Job(n, log) for n in names.split()}


def test_another_tenants_write_runs_beside_a_busy_tenants_never_behind(queue: ContributionQueue) -> None:
    log: list[str] = []
    jobs = _jobs("b1 b2 b3 a1", log)
    tickets = {n: queue.submit("b" if n.startswith("b") else "a", jobs[n], 60) for n in ("b1", "b2", "b3")}
    assert jobs["b1"].started.wait(WAIT)
    tickets["a1"] = queue.submit("a", jobs["a1"], 60)
    assert jobs["a1"].started.wait(WAIT)  # a free worker, though b has two more waiting
    assert not jobs["b2"].started.is_set()  # b runs one at a time
    jobs["a1"].release.set()
    assert tickets["a1"].future.result(WAIT) == "a1"
    assert not jobs["b2"].started.is_set()
    for name in ("b1", "b2", "b3"):
        jobs[name].release.set()
    assert [tickets[n].future.result(WAIT) for n in ("b1", "b2", "b3")] == ["b1", "b2", "b3"]
    b_events = [e for e in log if e.endswith(("b1", "b2", "b3"))]
    assert b_events == ["start b1", "end b1", "start b2", "end b2", "start b3", "end b3"]  # in order, never overlapping
    assert queue.stats() == {"running": 0, "waiting": 0, "by_tenant": {}}


def test_workers_take_tenants_in_turn() -> None:
    queue = ContributionQueue(workers=1, per_tenant=3, total=9)
    log: list[str] = []
    first = Job("x", log)
    queue.submit("x", first, 60)
    assert first.started.wait(WAIT)
    done = []
    for tenant in ("b", "b", "b", "a", "c"):
        done.append(queue.submit(tenant, lambda t, n=tenant: log.append(n), 60))
    first.release.set()
    for ticket in done:
        ticket.future.result(WAIT)
    assert log[2:] == ["b", "a", "c", "b", "b"]  # one of b's, then the others' before b's next
    queue.close()


def test_a_full_tenant_queue_is_refused_at_once_with_retry_after(queue: ContributionQueue) -> None:
    jobs = _jobs("b1 b2 b3 b4", [])
    for name in ("b1", "b2", "b3"):
        queue.submit("b", jobs[name], 60)
    t0 = time.perf_counter()
    with pytest.raises(ContributionQueueFullError, match="contribution_queue_per_tenant") as refused:
        queue.submit("b", jobs["b4"], 60)
    assert time.perf_counter() - t0 < 0.5 and 1 <= refused.value.retry_after_s <= 300
    other = queue.submit("a", lambda t: "a", 60)  # another tenant is still taken
    assert other.future.result(WAIT) == "a"
    for job in jobs.values():
        job.release.set()


def test_the_whole_queue_is_bounded_too(queue: ContributionQueue) -> None:
    jobs = _jobs("b1 b2 b3 c1 c2 d1", [])
    for name in ("b1", "b2", "b3", "c1", "c2"):
        queue.submit(name[0], jobs[name], 60)
    with pytest.raises(ContributionQueueFullError, match="contribution_queue_total"):
        queue.submit("d", jobs["d1"], 60)
    for job in jobs.values():
        job.release.set()


def test_a_write_past_its_deadline_stores_nothing_and_frees_its_slot() -> None:
    now = [0.0]
    queue = ContributionQueue(workers=1, per_tenant=2, total=2, clock=lambda: now[0])
    blocker, late = _jobs("blocker late", []).values()
    queue.submit("b", blocker, 60)
    assert blocker.started.wait(WAIT)
    ticket = queue.submit("a", late, 10)
    now[0] = 11.0  # the deadline passes while it waits for the one worker
    blocker.release.set()
    with pytest.raises(ContributionTimeoutError):
        ticket.future.result(WAIT)
    assert not late.started.is_set() and not late.stored
    assert queue.submit("a", lambda t: "again", 10).future.result(WAIT) == "again"
    queue.close()


def test_a_deadline_passing_while_it_runs_is_refused_before_the_write() -> None:
    now = [0.0]
    queue = ContributionQueue(workers=1, per_tenant=1, total=1, clock=lambda: now[0])
    job = Job("slow", [])
    ticket = queue.submit("a", job, 10)
    assert job.started.wait(WAIT)
    now[0] = 10.5  # segmentation took too long
    job.release.set()
    with pytest.raises(ContributionTimeoutError):
        ticket.future.result(WAIT)
    assert not job.stored
    queue.close()


def test_cancel_takes_back_a_waiting_or_running_job_but_never_a_begun_write(queue: ContributionQueue) -> None:
    waiting_blocker, waiting, running = _jobs("blocker waiting running", []).values()
    queue.submit("b", waiting_blocker, 60)
    assert waiting_blocker.started.wait(WAIT)
    held = queue.submit("b", waiting, 60)
    assert queue.cancel(held)  # still waiting: dropped, its slot freed at once
    with pytest.raises(ContributionTimeoutError):
        held.future.result(WAIT)
    assert queue.stats()["by_tenant"] == {"b": 1}
    ticket = queue.submit("a", running, 60)
    assert running.started.wait(WAIT)
    assert queue.cancel(ticket)  # running, not writing yet: its begin_write will refuse
    running.release.set()
    with pytest.raises(ContributionTimeoutError):
        ticket.future.result(WAIT)
    assert not running.stored and not waiting.started.is_set()

    writing, began = threading.Event(), threading.Event()

    def write(t: Ticket) -> str:
        t.begin_write()
        began.set()
        assert writing.wait(WAIT)
        return "stored"

    ticket = queue.submit("a", write, 60)
    assert began.wait(WAIT)
    assert not queue.cancel(ticket)  # the write has begun: its outcome stands
    writing.set()
    assert ticket.future.result(WAIT) == "stored"
    waiting_blocker.release.set()


def test_a_jobs_error_is_its_result_and_the_lane_goes_on(queue: ContributionQueue) -> None:
    def fail(ticket: Ticket) -> Any:
        raise ValueError("bad trajectory")

    bad = queue.submit("a", fail, 60)
    good = queue.submit("a", lambda t: "ok", 60)
    with pytest.raises(ValueError, match="bad trajectory"):
        bad.future.result(WAIT)
    assert good.future.result(WAIT) == "ok"


@pytest.mark.parametrize("bounds", [dict(workers=0, per_tenant=1, total=1), dict(workers=1, per_tenant=0, total=1),
                                    dict(workers=1, per_tenant=4, total=2)])
def test_bounds_out_of_range_say_what_is_allowed(bounds: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="workers >= 1"):
        ContributionQueue(**bounds)


def test_retry_after_follows_the_tenants_recent_write_durations() -> None:
    now = [0.0]
    queue = ContributionQueue(workers=1, per_tenant=1, total=4, clock=lambda: now[0])

    def slow(ticket: Ticket) -> None:
        now[0] += 40.0  # one write took 40 s

    queue.submit("b", slow, 600).future.result(WAIT)
    blocker = Job("b", [])
    queue.submit("b", blocker, 600)
    with pytest.raises(ContributionQueueFullError) as refused:
        queue.submit("b", lambda t: None, 600)
    assert 20 <= refused.value.retry_after_s <= 60
    blocker.release.set()
    queue.close()


def test_retry_after_is_at_least_how_long_the_tenants_running_write_has_run() -> None:
    now = [0.0]
    queue = ContributionQueue(workers=1, per_tenant=1, total=4, clock=lambda: now[0])
    first = Job("first", [])
    queue.submit("b", first, 600)  # the tenant's first write: no duration known yet
    assert first.started.wait(WAIT)
    now[0] = 45.0
    with pytest.raises(ContributionQueueFullError) as refused:
        queue.submit("b", lambda t: None, 600)
    assert refused.value.retry_after_s == 45
    first.release.set()
    queue.close()
