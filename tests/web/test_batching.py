"""Dynamic batching: concurrent predictions share one forward pass, each keeps its own result and error."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest

from pneumoscan.errors import ImageError
from pneumoscan.web.batching import Batcher, Job
from pneumoscan.web.limits import BusyError, DeadlineError, Limiter

from .test_app import jpeg, post, serve


class Model:
    """A forward that records the batch sizes it sees and can be held (so that requests pile up)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray):
        self.sizes.append(len(batch))
        self.entered.set()
        assert self.hold.wait(10)
        ids = batch[:, 0, 0, 0]
        return np.stack([ids, -ids], 1), ids[:, None] * 10  # each row is its own request's


def job(i: float) -> Job:
    return Job(np.full((3, 2, 2), i, np.float32), lambda p, f: (float(p[0]), float(f[0])))


def test_requests_waiting_behind_a_batch_run_as_the_next_batch():
    model = Model()
    b = Batcher(model, workers=4, queue=16, max_batch=16, max_wait_ms=0)
    try:
        model.hold.clear()
        first = b.submit(job, 0.0)
        assert model.entered.wait(5)
        rest = [b.submit(job, float(i)) for i in range(1, 7)]
        deadline = time.monotonic() + 5
        while len(b._waiting) < 6 and time.monotonic() < deadline:  # all six prepared, queued behind the first
            time.sleep(0.005)
        model.hold.set()
        assert first.result(5) == (0.0, 0.0)
        assert [f.result(5) for f in rest] == [(float(i), 10.0 * i) for i in range(1, 7)]
        assert model.sizes == [1, 6] and b.batch_sizes == {1: 1, 6: 1}
    finally:
        b.shutdown()


def test_max_batch_is_respected():
    model = Model()
    b = Batcher(model, workers=2, queue=16, max_batch=4, max_wait_ms=0)
    try:
        model.hold.clear()
        first = b.submit(job, 0.0)
        assert model.entered.wait(5)
        rest = [b.submit(job, float(i)) for i in range(1, 11)]
        deadline = time.monotonic() + 5
        while len(b._waiting) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        model.hold.set()
        wait([first, *rest], 5)
        assert model.sizes == [1, 4, 4, 2] and [f.result()[0] for f in rest] == [float(i) for i in range(1, 11)]
    finally:
        b.shutdown()


def test_two_runners_run_two_batches_at_once():
    """With runners=2 a second batch starts while the first is still in the model; every result stays its own."""
    model = Model()
    b = Batcher(model, workers=4, queue=16, max_batch=16, max_wait_ms=0, runners=2)
    try:
        model.hold.clear()
        first = b.submit(job, 0.0)
        assert model.entered.wait(5)
        model.entered.clear()
        second = b.submit(job, 1.0)
        assert model.entered.wait(5), "the second runner did not start a batch while the first was held"
        assert model.sizes == [1, 1] and not first.done() and not second.done()
        model.hold.set()
        assert first.result(5) == (0.0, 0.0) and second.result(5) == (1.0, 10.0)
    finally:
        b.shutdown()


def test_the_batch_waits_for_requests_still_being_decoded():
    model = Model()
    b = Batcher(model, workers=4, queue=8, max_batch=8, max_wait_ms=500)
    go, submitted = threading.Event(), threading.Event()

    def slow_job(i: float) -> Job:
        assert (go if i > 0 else submitted).wait(5)  # the first is ready once all four are in: no race
        return job(i)

    try:
        futs = [b.submit(slow_job, float(i)) for i in range(4)]  # one ready at once, three still decoding
        submitted.set()
        time.sleep(0.05)
        go.set()
        wait(futs, 5)
        assert model.sizes == [4]  # not [1, 3]: it waited (well under max_wait) for the three
    finally:
        b.shutdown()


def test_a_bad_request_fails_alone():
    model = Model()
    b = Batcher(model, workers=4, queue=8, max_batch=8, max_wait_ms=0)

    def bad_upload(_i: float) -> Job:
        raise ImageError("x.jpg: not an image (send a JPEG, PNG or DICOM file)")

    def bad_result(i: float) -> Job:
        return Job(np.full((3, 2, 2), i, np.float32), lambda p, f: 1 / 0)

    try:
        model.hold.clear()
        first = b.submit(job, 0.0)
        assert model.entered.wait(5)
        futs = [b.submit(job, 1.0), b.submit(bad_upload, 2.0), b.submit(bad_result, 3.0), b.submit(job, 4.0)]
        deadline = time.monotonic() + 5
        while len(b._waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        model.hold.set()
        wait([first, *futs], 5)
        assert futs[0].result() == (1.0, 10.0) and futs[3].result() == (4.0, 40.0)
        assert isinstance(futs[1].exception(), ImageError) and isinstance(futs[2].exception(), ZeroDivisionError)
        assert model.sizes == [1, 3]  # the undecodable upload never joined the batch
    finally:
        b.shutdown()


def test_a_failing_model_fails_only_its_batch():
    calls = []

    def forward(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("the runtime failed")
        return np.ones((len(batch), 2)), None

    b = Batcher(forward, workers=1, queue=4, max_batch=4, max_wait_ms=0)
    try:
        with pytest.raises(RuntimeError):
            b.submit(lambda: Job(np.zeros((3, 2, 2), np.float32), lambda p, f: p)).result(5)
        assert b.submit(lambda: Job(np.zeros((3, 2, 2), np.float32), lambda p, f: float(p[0]))).result(5) == 1.0
    finally:
        b.shutdown()


def test_queue_bound_and_deadline_as_the_limiter():
    model = Model()
    b = Batcher(model, workers=1, queue=1, max_batch=4, max_wait_ms=0)
    try:
        model.hold.clear()
        held = b.submit(job, 0.0)
        assert model.entered.wait(5)
        late = b.submit(job, 1.0, deadline=time.monotonic() + 0.05)
        assert b.full()
        with pytest.raises(BusyError):
            b.submit(job, 2.0)
        time.sleep(0.1)
        model.hold.set()
        assert held.result(5) == (0.0, 0.0)
        with pytest.raises(DeadlineError):
            late.result(5)
        deadline = time.monotonic() + 5
        while b.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        assert b.pending == 0 and not b.full()
    finally:
        b.shutdown()


@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(max_wait_ms=-1), dict(workers=0)])
def test_bad_settings(kw):
    from pneumoscan.errors import PneumoscanError

    args = dict(workers=1, queue=0, max_batch=4, max_wait_ms=1) | kw
    with pytest.raises(PneumoscanError):
        Batcher(lambda b: (b, None), **args)


def test_the_service_batches_concurrent_uploads_and_keeps_their_errors(model_dir):
    """Through the app: uploads sent while a batch runs go to the model together; a bad one is a 4xx alone."""
    with serve(model_dir, workers=4, queue=16, max_batch=8, runners=1) as c:
        service = c.service
        real = service.predictor.forward
        seen: list[int] = []
        hold = threading.Event()

        def forward(batch, features=False):  # the real network, watched (and held once so that uploads pile up)
            seen.append(len(batch))
            if len(seen) == 1:
                assert hold.wait(10)
            return real(batch, features)

        service.predictor.forward = forward
        bodies = [jpeg(seed=i) for i in range(6)] + [b"not an image at all"]
        results: dict[int, object] = {}

        def send(i: int) -> None:
            results[i] = post(c, bodies[i], name=f"x{i}.jpg")

        first = threading.Thread(target=send, args=(0,))
        first.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.005)
        others = [threading.Thread(target=send, args=(i,)) for i in range(1, 7)]
        for t in others:
            t.start()
        while len(service.limiter._waiting) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        hold.set()
        for t in [first, *others]:
            t.join(30)
        assert seen[0] == 1 and seen[1] == 5, seen  # five good uploads, one forward
        assert [results[i].status_code for i in range(6)] == [200] * 6 and results[6].status_code == 400
        alone = {i: post(c, bodies[i]).json()["probabilities"] for i in (1, 4)}  # batched == one at a time
        for i, p in alone.items():
            got = results[i].json()["probabilities"]
            assert max(abs(got[k] - p[k]) for k in p) < 1e-5
        info = c.get("/api/info").json()
        assert info["max_batch"] == 8 and info["precision"] == "fp32" and "no INT8 export" in info["precision_reason"]


def test_room_waits_for_a_slot_wakes_the_oldest_first_and_gives_up_after_the_wait():
    """Admission.room (the HAProxy-style queue wait the service holds a request in when the queue is full)."""
    lim = Limiter(workers=1, queue=0, name="jobs")
    gate = threading.Event()
    held = lim.submit(gate.wait)
    assert lim.full()

    async def scenario():
        assert not await lim.room(0)  # no wait: refused at once
        assert not await lim.room(0.05)  # nothing finishes within the wait
        assert not lim._waiters  # a waiter that gave up leaves no trace
        first = asyncio.ensure_future(lim.room(10))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(lim.room(0.5))
        await asyncio.sleep(0.02)
        threading.Timer(0.05, gate.set).start()  # the running job ends on another thread
        got_first = await asyncio.wait_for(first, 2)  # woken when the job ends, not at the end of its 10 s
        second_woken = second.done()
        return got_first, second_woken, await second

    got_first, second_woken, got_second = asyncio.run(scenario())
    held.result(5)
    # one slot freed, one waiter woken: the oldest; the second was not, and when its own wait ended
    # the slot was still free (nothing took it), which room reports as room
    assert got_first is True and not second_woken and got_second is True and not lim._waiters
    lim.shutdown()
