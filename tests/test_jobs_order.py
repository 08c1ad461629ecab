"""The job queue's order: waiting jobs run first-in-line first, can be moved and cancelled while they
wait, report their place in line, and leave a short record when they finish. Blocking fake jobs
(an Event each) hold the worker so the waiting list stays put while the test looks at it. The
queue routes are checked over a TestClient on the router with a stub studio."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from studio.jobs import JobCancelled, JobQueue, QueueClosed

WAIT = 5.0


@pytest.fixture
def queue():
    q = JobQueue()
    yield q
    q.shutdown()


class Blocker:
    """A job that runs until released, so the ones behind it stay in the waiting list."""

    def __init__(self, q: JobQueue, name: str = "blocker") -> None:
        self.started, self.gate = threading.Event(), threading.Event()

        def fn(state):
            self.started.set()
            assert self.gate.wait(WAIT), "blocker never released"
            return name

        self.job = q.submit(fn, name)
        assert self.started.wait(WAIT)

    def release(self):
        self.gate.set()
        return self.job.wait(WAIT)


def recorder(q: JobQueue, ran: list[str], names: list[str]):
    jobs = {}
    for name in names:
        jobs[name] = q.submit(lambda state, n=name: ran.append(n) or n, name,
                              request=SimpleNamespace(model_dump=lambda exclude=None, n=name: {"prompt": n}))
    return jobs


def ids(q: JobQueue) -> list[str]:
    return [j.state.description for j in q.waiting()]


def test_jobs_run_in_list_order_after_moves(queue):
    ran: list[str] = []
    blocker = Blocker(queue)
    jobs = recorder(queue, ran, ["a", "b", "c", "d"])
    assert ids(queue) == ["a", "b", "c", "d"]
    assert queue.move(jobs["d"].state.job_id, 0) == 1          # to the front
    assert queue.shift(jobs["a"].state.job_id, 1) == 3         # d, b, a, c
    assert queue.move(jobs["b"].state.job_id, 99) == 4         # past the end: last
    assert queue.shift(jobs["d"].state.job_id, -5) == 1        # already first: stays
    assert ids(queue) == ["d", "a", "c", "b"]
    blocker.release()
    for job in jobs.values():
        job.wait(WAIT)
    assert ran == ["d", "a", "c", "b"]


def test_position_counts_from_the_running_job(queue):
    blocker = Blocker(queue)
    jobs = recorder(queue, [], ["a", "b"])
    assert queue.position(blocker.job.state.job_id) == 0
    assert queue.position(jobs["a"].state.job_id) == 1
    assert queue.position(jobs["b"].state.job_id) == 2
    assert queue.job_count == 3
    blocker.release()
    jobs["b"].wait(WAIT)
    assert queue.position(jobs["b"].state.job_id) is None
    assert queue.position("task(424242)") is None
    assert queue.job_count == 0


def test_cancel_wakes_the_waiter_at_once_and_the_rest_still_run(queue):
    ran: list[str] = []
    blocker = Blocker(queue)
    jobs = recorder(queue, ran, ["a", "b", "c"])
    assert queue.cancel(jobs["b"].state.job_id)
    # the waiter hears it now, not when the worker reaches the job
    with pytest.raises(JobCancelled, match="cancelled"):
        jobs["b"].wait(0.5)
    assert queue.job_count == 3 and ids(queue) == ["a", "c"]
    assert not queue.cancel(jobs["b"].state.job_id)             # already gone
    assert not queue.cancel(blocker.job.state.job_id)           # running: interrupt() stops it
    assert queue.move(jobs["b"].state.job_id, 0) is None
    blocker.release()
    jobs["c"].wait(WAIT)
    assert ran == ["a", "c"]


def test_recent_records_how_each_job_ended(queue):
    blocker = Blocker(queue)
    ok = queue.submit(lambda state: 1, "fine", request=SimpleNamespace(
        model_dump=lambda exclude=None: {"prompt": "a cat", "steps": 4, "not_a_summary_field": 1}))
    bad = queue.submit(lambda state: (_ for _ in ()).throw(ValueError("steps: too many")), "broken")
    gone = queue.submit(lambda state: 1, "dropped")
    queue.cancel(gone.state.job_id)
    blocker.release()
    ok.wait(WAIT)
    with pytest.raises(ValueError):
        bad.wait(WAIT)
    recent = {r.description: r for r in queue.recent()}
    assert [r.description for r in queue.recent()] == ["broken", "fine", "blocker", "dropped"]  # newest first
    assert recent["fine"].outcome == "done" and recent["fine"].ok and recent["fine"].request == {
        "prompt": "a cat", "steps": 4}
    assert recent["broken"].outcome == "failed" and not recent["broken"].ok
    assert recent["broken"].error == "steps: too many"
    assert recent["dropped"].outcome == "cancelled" and recent["dropped"].duration is None
    assert recent["fine"].duration is not None and recent["fine"].finished > 0


def test_recent_keeps_only_the_last_few():
    q = JobQueue(recent_limit=3)
    try:
        jobs = [q.submit(lambda state: None, f"job {i}") for i in range(6)]
        jobs[-1].wait(WAIT)
        assert [r.description for r in q.recent()] == ["job 5", "job 4", "job 3"]
    finally:
        q.shutdown()


def test_interrupted_job_is_recorded_as_interrupted(queue):
    started = threading.Event()

    def fn(state):
        started.set()
        while not state.interrupted:
            threading.Event().wait(0.01)
        return "partial"

    job = queue.submit(fn, "long")
    assert started.wait(WAIT) and queue.interrupt()
    assert job.wait(WAIT) == "partial"
    assert queue.recent()[0].outcome == "interrupted"


def test_snapshot_dict_lists_positions_and_progress(queue):
    blocker = Blocker(queue)
    blocker.job.state.set_total(10)
    blocker.job.state.step = 5
    jobs = recorder(queue, [], ["a", "b"])
    view = queue.snapshot().as_dict()
    assert view["running"]["id"] == blocker.job.state.job_id and view["running"]["position"] == 0
    assert view["running"]["progress"] == pytest.approx(0.5)
    assert [(w["description"], w["position"]) for w in view["waiting"]] == [("a", 1), ("b", 2)]
    assert view["waiting"][0]["request"] == {"prompt": "a"}
    assert view["job_count"] == 3 and view["recent"] == []
    blocker.release()
    jobs["b"].wait(WAIT)


def test_shutdown_runs_what_waits_then_refuses_new_jobs():
    q = JobQueue()
    gate = threading.Event()
    first = q.submit(lambda state: gate.wait(WAIT), "first")
    second = q.submit(lambda state: "second ran", "second")
    q.shutdown()
    gate.set()
    assert second.wait(WAIT) == "second ran" and first.wait(WAIT)
    assert q.join(WAIT)
    late = q.submit(lambda state: "never", "late")
    with pytest.raises(QueueClosed):
        late.wait(0.5)


def test_many_threads_moving_and_cancelling_lose_no_job(queue):
    ran: list[str] = []
    blocker = Blocker(queue)
    names = [f"j{i}" for i in range(40)]
    jobs = recorder(queue, ran, names)
    cancelled = set(names[::5])

    def churn(offset: int):
        for i, name in enumerate(names):
            if name in cancelled and i % 2 == offset:
                queue.cancel(jobs[name].state.job_id)
            queue.move(jobs[name].state.job_id, (i * 7 + offset) % 40)
            queue.shift(jobs[name].state.job_id, -1 if i % 2 else 1)

    threads = [threading.Thread(target=churn, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    expected = [n for n in names if n not in cancelled]
    assert sorted(ids(queue)) == sorted(expected)
    order = ids(queue)
    blocker.release()
    for name in names:
        jobs[name].done.wait(WAIT)
    assert ran == order


# --- the routes -------------------------------------------------------------------------------------


@pytest.fixture
def client(queue):
    from studio.api.routes import build_queue_router

    app = FastAPI()
    app.include_router(build_queue_router(SimpleNamespace(queue=queue)))
    return TestClient(app)


def test_queue_route_lists_running_waiting_and_recent(client, queue):
    done = queue.submit(lambda state: None, "earlier")
    done.wait(WAIT)
    blocker = Blocker(queue)
    jobs = recorder(queue, [], ["a", "b"])
    body = client.get("/studio/v1/queue").json()
    assert body["running"]["id"] == blocker.job.state.job_id and body["running"]["description"] == "blocker"
    assert [(w["id"], w["position"]) for w in body["waiting"]] == [
        (jobs["a"].state.job_id, 1), (jobs["b"].state.job_id, 2)]
    assert body["recent"][0]["description"] == "earlier" and body["recent"][0]["outcome"] == "done"
    assert body["job_count"] == 3
    blocker.release()


def test_move_route_takes_places_and_words(client, queue):
    blocker = Blocker(queue)
    jobs = recorder(queue, [], ["a", "b", "c"])
    a, b, c = (jobs[n].state.job_id for n in "abc")
    assert client.post(f"/studio/v1/queue/{c}/move", json={"to": "first"}).json() == {"id": c, "position": 1}
    assert client.post(f"/studio/v1/queue/{c}/move", json={"to": "down"}).json()["position"] == 2
    assert ids(queue) == ["a", "c", "b"]
    assert client.post(f"/studio/v1/queue/{b}/move", json={"to": "up"}).json()["position"] == 2
    assert client.post(f"/studio/v1/queue/{b}/move", json={"to": "up"}).json()["position"] == 1
    assert client.post(f"/studio/v1/queue/{b}/move", json={"to": "last"}).json()["position"] == 3
    assert client.post(f"/studio/v1/queue/{b}/move", json={"to": 2}).json()["position"] == 2
    assert client.post(f"/studio/v1/queue/{a}/move", json={"to": 9}).json()["position"] == 3
    assert ids(queue) == ["b", "c", "a"]
    blocker.release()


def test_move_route_places_a_job_before_or_after_another(client, queue):
    blocker = Blocker(queue)
    jobs = recorder(queue, [], ["a", "b", "c"])
    a, b, c = (jobs[n].state.job_id for n in "abc")
    assert client.post(f"/studio/v1/queue/{c}/move", json={"to": {"before": a}}).json() == {"id": c, "position": 1}
    assert ids(queue) == ["c", "a", "b"]
    assert client.post(f"/studio/v1/queue/{c}/move", json={"to": {"after": b}}).json()["position"] == 3
    assert ids(queue) == ["a", "b", "c"]
    running = blocker.job.state.job_id
    for other in (running, "task(999999)"):
        answer = client.post(f"/studio/v1/queue/{a}/move", json={"to": {"after": other}})
        assert answer.status_code == 404 and "is not a waiting job" in answer.json()["detail"]
    assert ids(queue) == ["a", "b", "c"]
    blocker.release()


@pytest.mark.parametrize("to", [0, -1, "sideways", True, None, 1.5, {"beside": "task(1)"}, {"before": 3},
                                {"before": "task(1)", "after": "task(2)"}, {}])
def test_move_route_refuses_a_bad_place_with_a_422(client, queue, to):
    blocker = Blocker(queue)
    job = queue.submit(lambda state: None, "a")
    answer = client.post(f"/studio/v1/queue/{job.state.job_id}/move", json={"to": to})
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith(
        "to: a place in line (1 = runs next), one of up, down, first, last, or {\"before\": id} / {\"after\": id} "
        "of another waiting job; got ")
    blocker.release()


def test_unknown_or_running_job_is_a_404_that_says_why(client, queue):
    blocker = Blocker(queue)
    running = blocker.job.state.job_id
    answer = client.post(f"/studio/v1/queue/{running}/move", json={"to": 1})
    assert answer.status_code == 404 and "is running" in answer.json()["detail"]
    assert "/sdapi/v1/interrupt" in client.delete(f"/studio/v1/queue/{running}").json()["detail"]
    answer = client.delete("/studio/v1/queue/task(999999)")
    assert answer.status_code == 404 and "no waiting job 'task(999999)'" in answer.json()["detail"]
    job = queue.submit(lambda state: None, "a")
    assert client.delete(f"/studio/v1/queue/{job.state.job_id}").json() == {"cancelled": job.state.job_id}
    with pytest.raises(JobCancelled):
        job.wait(WAIT)
    assert client.get("/studio/v1/queue").json()["recent"][0]["outcome"] == "cancelled"
    blocker.release()


def test_lanes_run_at_once_and_keep_their_own_order():
    """A second lane (the cluster's dispatchers) runs beside the local worker: two cluster jobs run at
    once, each lane takes its own jobs in order, and job_count, interrupt and skip see them all."""
    q = JobQueue()
    q.add_lane("cluster", 2)
    assert q.lanes == {"local": 1, "cluster": 2}
    gate = threading.Event()
    started: list[str] = []

    def blocked(name: str):
        def run(state):
            started.append(name)
            gate.wait(WAIT)
            return (name, state.interrupted, state.skipped)
        return run

    jobs = [q.submit(blocked(f"c{i}"), f"c{i}", lane="cluster") for i in range(3)]
    local = q.submit(blocked("local"), "local")
    deadline = time.monotonic() + WAIT
    while len(q.running()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    running = [job.state.description for job in q.running()]
    assert sorted(running) == ["c0", "c1", "local"] and q.job_count == 4
    view = q.snapshot().as_dict()
    assert len(view["running_all"]) == 3 and [w["description"] for w in view["waiting"]] == ["c2"]
    assert q.interrupt(jobs[1].state.job_id) and not jobs[0].state.interrupted
    assert q.skip() and all(job.state.skipped for job in q.running())
    gate.set()
    assert jobs[1].wait(WAIT) == ("c1", True, True)
    assert [job.wait(WAIT)[0] for job in jobs] == ["c0", "c1", "c2"] and local.wait(WAIT)[0] == "local"
    assert started.index("c2") > max(started.index("c0"), started.index("c1"))
    q.shutdown()
    assert q.join(WAIT)
