"""The protocol's version and limits: part of the contract, enforced when decoding."""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_NONCE_TTL_S",
    "MAX_ERROR_DETAIL_CHARS",
    "MAX_FRAME_BYTES",
    "MAX_LEASE_UNTIL",
    "MAX_LOG_CHUNK_BYTES",
    "MAX_SEQ",
    "MAX_TELEMETRY_BATCH",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
]

#: The one version this code speaks; every frame carries it as ``v``.
PROTOCOL_VERSION: Final = 1

#: Largest frame, in UTF-8 bytes of the JSON text. Matches the websocket ``max_size`` the
#: link and the coordinator configure, so a frame over it is refused before it is parsed.
MAX_FRAME_BYTES = 1024 * 1024

#: Most samples in one ``telemetry`` batch (10 minutes of 1 s samples).
MAX_TELEMETRY_BATCH = 600

#: Most UTF-8 bytes of log text in one ``job_log`` chunk.
MAX_LOG_CHUNK_BYTES = 64 * 1024

#: Longest ``detail`` of an ``error`` message, in characters.
MAX_ERROR_DETAIL_CHARS = 1024

#: Latest ``lease_until`` of a ``service_renew``, in seconds since the epoch (the year
#: 5138): a finite time any clock can compare with; the agent then holds a renewal to one
#: lease from its own now.
MAX_LEASE_UNTIL = 1e11

#: Largest sequence number: a signed 64-bit SQLite INTEGER holds every seq.
MAX_SEQ = 2**63 - 1

#: Random bytes in a handshake or attestation nonce (sent base64, 44 characters).
NONCE_BYTES = 32

#: How long a nonce may be answered after it was issued, in seconds.
DEFAULT_NONCE_TTL_S = 30.0

#: Image layers whose download progress one ``job_status`` carries; an image has tens.
MAX_PROGRESS_LAYERS = 256

#: URL inputs whose fetch progress one ``job_status`` carries, and the characters of
#: each one's path shown (a longer path is cut).
MAX_PROGRESS_INPUTS = 256
MAX_PROGRESS_PATH_CHARS = 256
