"""A job's inputs by URL, fetched (or found in the cache) before its container starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

from agent.config.settings import CacheConfig
from agent.errors import ConfigError
from agent.inputs.cache import InputCache
from agent.inputs.fetch import FetchLimits, fetch
from sandbox.spec import WorkloadSpec

__all__ = ["Inputs", "stage_inputs"]


class Inputs:
    """The cache and the fetch limits a job manager (or ``run-local``) stages inputs with."""

    def __init__(self, cache: InputCache, limits: FetchLimits) -> None:
        self.cache = cache
        self.limits = limits

    def stage(
        self, spec: WorkloadSpec, allowed_hosts: list[str]
    ) -> AbstractAsyncContextManager[dict[str, Path]]:
        """:func:`stage_inputs` with this cache and these limits."""
        return stage_inputs(self.cache, spec, allowed_hosts, self.limits)

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


@asynccontextmanager
async def stage_inputs(
    cache: InputCache, spec: WorkloadSpec, allowed_hosts: list[str], limits: FetchLimits
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
            )
            files[item.path] = await stack.enter_async_context(
                cache.use(item.sha256, item.size_bytes, fill)
            )
        yield files
