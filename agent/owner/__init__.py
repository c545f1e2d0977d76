"""The machine owner's say: the pure policy (``policy``), the guard that applies it to
running jobs (``guard``), GPU power limits (``power``) and whether someone is at the
machine (``idle``)."""
