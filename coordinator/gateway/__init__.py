"""The coordinator's OpenAI-compatible gateway: clients' requests to the nodes' services.

A client calls ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings`` with a
bearer API key; the gateway routes the request by its ``model`` to a ready replica (a
service job whose node's tunnel is up) and passes the answer back as it comes
(docs/services.md, "Gateway"). Pure decisions (:mod:`.routing`, :mod:`.limits`,
:mod:`.usage`, :mod:`.answers`) apart from the I/O (:mod:`.server`, :mod:`.client_conn`,
:mod:`.upstream`, :mod:`.proxy`) and the store's tables (:mod:`.tables`).
"""

from __future__ import annotations

__all__: list[str] = []
