"""Where a job's outputs wait for upload, and the uploads themselves.

Each job whose offer names upload targets gets a spool directory of its own,
``spool_dir/<job id>/``, that the runner copies the collected outputs into
(:meth:`sandbox.runner.Runner.run`, ``keep_outputs``); it outlives the job directory and the
agent, and is removed only once the job's final state is on disk (after every upload was
acknowledged, or could not be). The node's spool is capped: a job is admitted only if its
``output_max_bytes`` fits beside what the jobs already holding spool space may write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import msgspec

from agent.errors import UploadError
from agent.jobs import machine
from agent.jobs.ledger import JobRecord, Ledger
from agent.jobs.machine import Upload
from agent.jobs.uploader import RetryPolicy, put_file
from agent.protocol.jobs import Offer, Receipt

__all__ = ["Delivery"]

_log = logging.getLogger(__name__)


class Delivery:
    """The node's output spool, its size budget, and the client that empties it."""

    def __init__(
        self,
        spool_dir: Path,
        *,
        max_bytes: int,
        ca_file: Path | None = None,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 (an immutable tuple)
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool_dir = spool_dir
        self.max_bytes = max_bytes
        self.ca_file = ca_file
        self.policy = policy
        self._clock = clock
        self._reserved: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        """The uploads under way, by job id (a stop cancels them)."""

    def reserve(self, job_id: str, nbytes: int) -> bool:
        """Hold ``nbytes`` of the spool for a job; False if that would pass the cap."""
        if sum(self._reserved.values()) + nbytes > self.max_bytes:
            return False
        self._reserved[job_id] = nbytes
        return True

    def release(self, job_id: str) -> None:
        """Give a job's spool space back."""
        self._reserved.pop(job_id, None)

    def spool(self, job_id: str) -> Path:
        """A new, empty, private spool directory for a job."""
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.spool_dir / job_id
        shutil.rmtree(path, ignore_errors=True)  # what a crash left before it was recorded
        path.mkdir(mode=0o700)
        return path

    def discard(self, spool: str) -> None:
        """Remove a spool directory (its job's final state is on disk)."""
        path = Path(spool)
        if path.parent == self.spool_dir:  # never anything the ledger names elsewhere
            shutil.rmtree(path, ignore_errors=True)

    def sweep(self, keep: Iterable[str]) -> None:
        """Remove spool directories of jobs that no longer upload (a crash left them)."""
        kept = set(keep)
        if not self.spool_dir.is_dir():
            return
        for entry in os.scandir(self.spool_dir):
            if entry.name not in kept:
                _log.info("removing the leftover spool of job %s", entry.name)
                shutil.rmtree(entry.path, ignore_errors=True)

    def resumable(self, ledger: Ledger, record: JobRecord) -> Upload | None:
        """The uploads of a job a restart found ``uploading``, its spool space held again;
        None if it was not uploading."""
        held = ledger.held(record.job_id) if record.state == "uploading" else None
        if held is None:
            return None
        offer = msgspec.json.decode(record.offer, type=Offer)
        upload = machine.resume(record.job_id, held[0], offer.uploads, held[1]).upload
        if upload is not None:
            self._reserved[record.job_id] = sum(f[3] for f in upload.files)
        return upload

    async def deliver(
        self,
        upload: Upload,
        acknowledged: Callable[[str], None],
        *,
        cancelled: Callable[[], bool],
    ) -> tuple[Receipt, str]:
        """Run the upload as a task of :attr:`tasks`; the receipt and detail the job ends
        with: as held, or ``error``/``upload_failed``, or ``cancelled`` when its task was
        cancelled and ``cancelled()`` says the coordinator asked.

        Raises:
            asyncio.CancelledError: its task was cancelled otherwise (the agent stops: the
                job stays ``uploading`` for the next start).
        """
        job_id, receipt, detail = upload.job_id, upload.receipt, upload.detail
        task = self.tasks[job_id] = asyncio.create_task(self.run(upload, acknowledged))
        try:
            await task
        except UploadError as exc:
            _log.warning("job %s: outputs not delivered: %s", job_id, exc)
            detail = f"{exc.code}: {exc.detail}"
            receipt = msgspec.structs.replace(receipt, state="error", code="upload_failed")
        except asyncio.CancelledError:
            if not cancelled():
                raise
            receipt = msgspec.structs.replace(receipt, state="cancelled", code="cancelled")
        finally:
            self.tasks.pop(job_id, None)
        return receipt, detail

    async def run(self, upload: Upload, acknowledged: Callable[[str], None]) -> None:
        """PUT each of the upload's files, calling ``acknowledged(path)`` after each 2xx;
        each retried until ``policy.give_up_s`` after the job ended.

        Raises:
            UploadError: the first output that could not be delivered.
        """
        spool = Path(upload.spool)
        ended = upload.receipt.finished_at
        deadline = (self._clock() if ended is None else ended) + self.policy.give_up_s
        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None:  # the coordinator's own store, under its own CA
            verify = ssl.create_default_context()
            verify.load_verify_locations(cafile=str(self.ca_file))
        async with httpx.AsyncClient(verify=verify, follow_redirects=False) as client:
            for index, path, target, size, sha256 in upload.files:
                file = spool / str(index)
                if not file.is_file():
                    raise UploadError("upload_failed", f"{path}: its spool file is gone")
                await put_file(
                    client,
                    file,
                    target,
                    size=size,
                    sha256=sha256,
                    policy=self.policy,
                    deadline=deadline,
                    clock=self._clock,
                )
                acknowledged(path)
