"""The images the agent pulled, kept within a disk budget: least recently used out first;
and pulled ahead of time when the coordinator asks (``image_prefetch``).

Only images the agent pulled are in the ledger's ``images`` table, so only those are ever
removed: an image the owner built or pulled is not the agent's to touch. After each pull
(and at start), while the cached images take more than ``max_bytes`` together, or the
engine's disk has less than ``min_free_bytes`` free, the least recently used image that
no running job uses is removed through the engine (which refuses, and is skipped, while
any container still uses it). Removal is by image id, so another tag of the same image
held by the owner keeps it; the engine then keeps the layers others share.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass

from agent.jobs.images import ImageGate
from agent.jobs.ledger import CachedImage, Ledger
from agent.jobs.machine import Decision, ImagePulled, ImageRemoved
from oci import OciError
from sandbox.engine import Engine
from sandbox.errors import EngineError, SandboxError
from sandbox.runner import Runner
from sandbox.spec import ImageRef

__all__ = ["ImageCache", "Prefetcher", "Trim"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trim:
    """What a trim did: the references removed."""

    removed: tuple[str, ...] = ()


class ImageCache:
    """Keeps the pulled images within budget (see the module)."""

    def __init__(
        self,
        engine: Engine,
        ledger: Ledger,
        carry_out: Callable[[Decision], None],
        *,
        max_bytes: int,
        min_free_bytes: int,
        free_bytes: Callable[[str], int] | None = None,
    ) -> None:
        self.engine = engine
        self.ledger = ledger
        self.carry_out = carry_out
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes or (lambda path: shutil.disk_usage(path).free)

    async def trim(self, in_use: Collection[str]) -> Trim:
        """Remove least recently used images, none in ``in_use`` (references of running
        jobs), until the cache is within its budget and the disk has its free floor."""
        cached = self.ledger.cached_images()
        total = sum(image.size for image in cached)
        root = await self._docker_root()
        removed: list[str] = []
        for image in cached:
            if not self._over(total, root):
                break
            if image.reference in in_use:
                continue
            if await self._remove(image):
                removed.append(image.reference)
                total -= image.size
        if self._over(total, root):
            _log.warning("the image cache holds %d bytes; nothing more can be removed now", total)
        return Trim(tuple(removed))

    def _over(self, total: int, root: str | None) -> bool:
        if total > self.max_bytes:
            return True
        if root is None:
            return False
        try:
            return self._free_bytes(root) < self.min_free_bytes
        except OSError:
            return False  # the engine's disk is not visible from here: the budget alone

    async def _docker_root(self) -> str | None:
        try:
            return (await self.engine.info()).docker_root_dir
        except EngineError as exc:
            _log.warning("cannot ask the engine where it keeps images: %s", exc)
            return None

    async def _remove(self, image: CachedImage) -> bool:
        try:
            gone = await self.engine.remove_image(image.image_id)
        except EngineError as exc:
            _log.warning("could not remove cached image %s: %s", image.reference, exc)
            return False
        if gone:
            _log.info("removed cached image %s (%d bytes)", image.reference, image.size)
            self.carry_out(Decision(rows=(ImageRemoved(image.reference),)))
        return gone


class Prefetcher:
    """Pulls images the coordinator names ahead of the jobs that will want them, one task
    per image at a time, in the background: the link is not held while a pull runs."""

    def __init__(
        self,
        cache: ImageCache,
        runner: Runner,
        gate: ImageGate,
        *,
        allowed: Callable[[ImageRef], bool],
        in_use: Callable[[], Collection[str]],
    ) -> None:
        self.cache = cache
        self.runner = runner
        self.gate = gate
        self.allowed = allowed
        self.in_use = in_use
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def soon(self, image: str) -> bool:
        """Start pulling ``image`` (``repository@sha256:...``) unless the policy refuses
        it or it is being pulled; False (and logged) when refused."""
        try:
            ref = ImageRef.parse(image)
        except ValueError as exc:
            _log.warning("prefetch of %r refused: %s", image, exc)
            return False
        if ref.repository is None or ref.digest is None or not self.allowed(ref):
            _log.warning("prefetch of %s refused: not pinned, or not allowed here", image)
            return False
        key = f"{ref.repository}@{ref.digest}"
        if key not in self.tasks:
            self.tasks[key] = asyncio.create_task(self._pull(key, ref))
        return True

    async def close(self) -> None:
        """Stop the pulls under way (at shutdown)."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _pull(self, key: str, ref: ImageRef) -> None:
        try:
            await self.gate.check(ref)
            pulled = await self.runner.prefetch(ref)
            if pulled is not None:
                row = ImagePulled(pulled.reference, pulled.image_id, pulled.size)
                self.cache.carry_out(Decision(rows=(row,)))
                _log.info("prefetched %s (%d bytes)", key, pulled.size)
                await self.cache.trim(in_use={*self.in_use(), key})
        except (SandboxError, OciError) as exc:
            _log.warning("prefetch of %s failed: %s", key, exc)
        finally:
            del self.tasks[key]
