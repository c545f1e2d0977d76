"""A job's inputs by URL, fetched (or found in the cache) before its container starts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

from agent.config.settings import CacheConfig
from agent.errors import ConfigError
from agent.inputs.cache import InputCache
from agent.inputs.fetch import FetchLimits, fetch
from agent.inputs.progress import FetchProgress
from sandbox.spec import WorkloadSpec

__all__ = ["Inputs", "Progress", "stage_inputs"]


class Inputs:
    """The cache and the fetch limits a job manager (or ``run-local``) stages inputs with."""

    def __init__(self, cache: InputCache, limits: FetchLimits) -> None:
        self.cache = cache
        self.limits = limits

    def stage(
        self, spec: WorkloadSpec, allowed_hosts: list[str], progress: Progress | None = None
    ) -> AbstractAsyncContextManager[dict[str, Path]]:
        """:func:`stage_inputs` with this cache and these limits."""
        return stage_inputs(self.cache, spec, allowed_hosts, self.limits, progress)

    def progress(
        self,
        spec: WorkloadSpec,
        *,
        every_s: float,
        clock: Callable[[], float],
        report: Callable[[Mapping[str, tuple[int, int]]], None],
    ) -> FetchProgress:
        """The progress of fetching ``spec``'s URL inputs; those in the cache are done."""
        sizes = {item.path: item.size_bytes for item in spec.inputs if item.size_bytes}
        held = frozenset(
            item.path for item in spec.inputs if item.sha256 and self.cache.holds(item.sha256)
        )
        return FetchProgress(sizes, every_s=every_s, clock=clock, report=report, done=held)

    @classmethod
    def open(cls, state_dir: Path, settings: CacheConfig) -> Inputs:
        """The cache under ``state_dir/cache/inputs``, opened (what a killed fetch left is
        removed), with the ``[cache]`` settings; ConfigError if it cannot be used."""
        cache = InputCache(state_dir / "cache" / "inputs", settings.inputs_max_bytes)
        try:
            cache.open()
        except OSError as exc:
            detail = f"cannot use the input cache {cache.root}: {exc.strerror or exc}"
            raise ConfigError("bad_config", detail) from None
        limits = FetchLimits(stall_s=settings.input_stall_s, deadline_s=settings.input_deadline_s)
        return cls(cache, limits)


#: Called with an input's path and its bytes fetched so far (its size once it is there).
Progress = Callable[[str, int], None]


@asynccontextmanager
async def stage_inputs(
    cache: InputCache,
    spec: WorkloadSpec,
    allowed_hosts: list[str],
    limits: FetchLimits,
    progress: Progress | None = None,
) -> AsyncIterator[dict[str, Path]]:
    """Each URL input of ``spec`` as ``{path in /input: cached host file}``, held in the
    cache (not evicted) until the block ends; InputError if one cannot be had."""
    async with AsyncExitStack() as stack:
        files: dict[str, Path] = {}
        for item in spec.inputs:
            if item.url is None or item.sha256 is None or item.size_bytes is None:
                continue
            fill = partial(
                fetch,
                item.url,
                sha256=item.sha256,
                size_bytes=item.size_bytes,
                allowed_hosts=allowed_hosts,
                limits=limits,
                progress=None if progress is None else partial(progress, item.path),
            )
            files[item.path] = await stack.enter_async_context(
                cache.use(item.sha256, item.size_bytes, fill)
            )
            if progress is not None:  # fetched, or found whole (maybe another job's fetch)
                progress(item.path, item.size_bytes)
        yield files
