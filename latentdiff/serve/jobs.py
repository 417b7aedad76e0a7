"""The queue in front of the model: one worker thread makes one job at a time; at most `size` wait behind it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import traceback

from .engine import Engine, Job


class QueueFull(Exception):
    pass


class Worker:
    def __init__(self, engine: Engine, size: int = 16):
        self.engine = engine
        self.size = size
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="latentdiff-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> "asyncio.Future":
        """Queue `job`; its future gets the response (or the error). QueueFull when `size` jobs already wait."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait((job, future))
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.size} requests wait for the model); try again later") from None
        return asyncio.wrap_future(future)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            job, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            self.current = job
            try:
                future.set_result(self.engine.run(job))
            except BaseException as error:  # noqa: BLE001 - the request gets the error; the worker goes on
                if not isinstance(error, ValueError):
                    traceback.print_exc()
                future.set_exception(error)
            finally:
                self.current = None

    def interrupt(self) -> None:
        """Stop the running job after its current step; it answers with what it made."""
        job = self.current
        if job is not None:
            job.interrupted = True

    def skip(self) -> None:
        """End the running job's current iteration after its current step; the next one (n_iter) goes on."""
        job = self.current
        if job is not None:
            job.skipped = True

    def progress(self) -> dict:
        """A1111's /sdapi/v1/progress: the running job's fraction done, the estimated seconds left, its state."""
        job = self.current
        if job is None or job.started is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "queued": self.waiting,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                              "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        n_iter = job.request["n_iter"]
        done = (job.iteration + (job.step / job.steps if job.steps else 0)) / n_iter
        elapsed = time.time() - job.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return {"progress": done, "eta_relative": eta, "current_image": None, "queued": self.waiting,
                "textinfo": f"Batch {job.iteration + 1} of {n_iter}, step {job.step} of {job.steps}",
                "state": {"skipped": job.skipped, "interrupted": job.interrupted, "job": job.kind,
                          "job_count": n_iter, "job_no": job.iteration, "sampling_step": job.step,
                          "sampling_steps": job.steps,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created))}}
