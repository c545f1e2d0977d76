"""Telemetry downsampling: raw batches for a window, then per-minute aggregates per GPU.

At 10,000 agents the raw telemetry is ~56 MB every second; kept raw for days it would fill
any disk. Past :attr:`Settings.telemetry_raw_s` each node's raw batches become one row per
(minute, GPU, metric) in ``telemetry_minutes`` (min, mean, max and the count of samples) and
the raw rows go. The minute is the sample's own ``taken_at``; every numeric reading of a
GPU is a metric (``unsupported``/``unavailable`` readings, strings and lists are not).

The work is the database's (its JSON functions over the batches' text; no Python object
per sample; a batch stored as its deflated frame is inflated first, by an SQL function on
SQLite, and here for PostgreSQL, which cannot) on a thread of its own, with its own
connection, one short transaction per node: the event loop never waits for it, and the
group-commit writer waits at most one node's transaction (on PostgreSQL: only for the node
being folded, whose row it locks). A SQLite connection commits here with
``synchronous=NORMAL``: a transaction both writes the aggregates and deletes their rows, so
a power loss undoes both or neither, and nothing of it was ever acknowledged to anyone.
"""

from __future__ import annotations

import logging

from coordinator.db import JSONB, Database, DbTarget, SqliteDatabase, driver_errors
from coordinator.db_open import open_database
from coordinator.nodes_store import STORED_SIZE, inflated_body

__all__ = ["SCHEMA", "downsample"]

_log = logging.getLogger(__name__)

#: Schema version 7 (:mod:`coordinator.store`): the aggregates, and raw rows by their time.
SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry_minutes (
    node_id TEXT NOT NULL REFERENCES nodes(node_id),
    minute INTEGER NOT NULL,
    gpu TEXT NOT NULL,
    metric TEXT NOT NULL,
    min REAL NOT NULL,
    mean REAL NOT NULL,
    max REAL NOT NULL,
    samples INTEGER NOT NULL,
    PRIMARY KEY (node_id, minute, gpu, metric)
) STRICT, WITHOUT ROWID;
-- What a pass folds (and retention prunes) found by when it was received, from this index
-- alone: ``received`` is stored after the ~56 KB body, so a search by it read every row of
-- every node, the whole store (10 GB a few minutes into 10,000 agents), at each pass.
CREATE INDEX IF NOT EXISTS messages_by_received ON messages (node_id, type, received);
"""

# The raw rows of one node to fold: telemetry received before the window.
_RAW = "FROM messages WHERE node_id = ? AND type = 'telemetry' AND received < ?"

# Each numeric reading of each GPU of each sample, folded into its minute; a minute that
# spans two passes (or two batches) is merged: counts add, the mean is weighted by them.
# Readings kept as PostgreSQL's are: 1e400 passes the protocol (a sample's values are kept
# as received) and is inf to SQLite's JSON, and inf beside -inf averages to NaN, which
# SQLite stores as NULL, failing the pass.
_FOLD_SQLITE = """
INSERT INTO telemetry_minutes (node_id, minute, gpu, metric, min, mean, max, samples)
SELECT ?1, CAST(json_extract(s.value, '$.taken_at') / 60 AS INTEGER) * 60 AS minute,
       json_extract(g.value, '$.id') AS gpu, k.key AS metric,
       MIN(k.value), AVG(k.value), MAX(k.value), COUNT(*)
FROM (SELECT CASE WHEN deflated IS NULL THEN body ELSE inflated_body(deflated) END AS body
      FROM messages WHERE node_id = ?1 AND type = 'telemetry' AND received < ?2) AS m,
     json_each(m.body, '$.samples') AS s,
     json_each(s.value, '$.gpus') AS g,
     json_each(g.value) AS k
WHERE k.type IN ('integer', 'real')
  AND abs(k.value) < 1e300
  AND json_type(s.value, '$.taken_at') IN ('integer', 'real')
  AND abs(json_extract(s.value, '$.taken_at')) < 1e15
  AND json_type(g.value, '$.id') = 'text'
GROUP BY minute, gpu, metric
ON CONFLICT (node_id, minute, gpu, metric) DO UPDATE SET
    min = MIN(min, excluded.min),
    max = MAX(max, excluded.max),
    mean = (mean * samples + excluded.mean * excluded.samples) / (samples + excluded.samples),
    samples = samples + excluded.samples
"""


# PostgreSQL's: jsonb, each value checked for its type before it is cast (a cast of the
# wrong type is an error there, not a NULL), readings as numeric (1e400 is one, a float8
# overflows) and only those a float8 holds kept. ``{bodies}`` is where the batches' text
# comes from: the rows stored as text, or those stored deflated, inflated by the caller
# (the server cannot inflate them itself) and passed as one array.
_FOLD_POSTGRES = """
INSERT INTO telemetry_minutes (node_id, minute, gpu, metric, min, mean, max, samples)
SELECT CAST(? AS TEXT), (trunc(taken_at / 60) * 60)::bigint AS minute, gpu, metric,
       MIN(v), AVG(v), MAX(v), COUNT(*)
FROM (
    SELECT CASE WHEN jsonb_typeof(s.value -> 'taken_at') = 'number'
                THEN (s.value -> 'taken_at')::numeric END AS taken_at,
           CASE WHEN jsonb_typeof(g.value -> 'id') = 'string' THEN g.value ->> 'id' END AS gpu,
           k.key AS metric,
           CASE WHEN jsonb_typeof(k.value) = 'number' THEN k.value::numeric END AS v
    FROM ({bodies}) AS m
    CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(m.b -> 'samples')
        WHEN 'array' THEN m.b -> 'samples' ELSE '[]' END) AS s
    CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(s.value -> 'gpus')
        WHEN 'array' THEN s.value -> 'gpus' ELSE '[]' END) AS g
    CROSS JOIN LATERAL jsonb_each(CASE jsonb_typeof(g.value)
        WHEN 'object' THEN g.value ELSE '{{}}' END) AS k
) AS readings
WHERE v IS NOT NULL AND taken_at IS NOT NULL AND gpu IS NOT NULL
  AND abs(v) < 1e300 AND abs(taken_at) < 1e15
GROUP BY minute, gpu, metric
ON CONFLICT (node_id, minute, gpu, metric) DO UPDATE SET
    min = LEAST(telemetry_minutes.min, excluded.min),
    max = GREATEST(telemetry_minutes.max, excluded.max),
    mean = (telemetry_minutes.mean * telemetry_minutes.samples
            + excluded.mean * excluded.samples)
           / (telemetry_minutes.samples + excluded.samples),
    samples = telemetry_minutes.samples + excluded.samples
"""
_FOLD_POSTGRES_TEXT = _FOLD_POSTGRES.format(
    bodies=f"SELECT {JSONB.format('body')} AS b {_RAW} AND deflated IS NULL"
)
_FOLD_POSTGRES_INFLATED = _FOLD_POSTGRES.format(
    bodies=f"SELECT {JSONB.format('t')} AS b FROM unnest(CAST(? AS TEXT[])) AS t"
)
#: Deflated batches inflated and folded a statement at a time: ~3.5 MB of text at most.
_INFLATED_AT_ONCE = 64


def downsample(target: DbTarget, received_before: float, aggregates_before: float) -> int:
    """Fold every node's raw telemetry received before ``received_before`` into per-minute
    aggregates, and delete the aggregates of minutes before ``aggregates_before``; returns
    how many raw rows were folded. Opens its own connection: run it on a thread."""
    db = open_database(target)
    try:
        if isinstance(db, SqliteDatabase):
            db.execute("PRAGMA synchronous=NORMAL")
            db.function("inflated_body", 1, _inflated_body)
        folded = 0
        # A transaction only for the nodes that have raw rows to fold (the others would
        # take the write lock for nothing).
        nodes = db.execute(
            "SELECT n.node_id FROM nodes n WHERE EXISTS (SELECT 1 FROM messages m"
            " WHERE m.node_id = n.node_id AND m.type = 'telemetry' AND m.received < ?)",
            (received_before,),
        ).fetchall()
        for (node_id,) in nodes:
            try:
                folded += _fold(db, str(node_id), received_before)
            except driver_errors() as exc:
                # Rows the database will not fold (a hostile batch it cannot read, a
                # damaged page) hold back no other node: theirs stay raw, counted by the
                # quota, until retention deletes them.
                _log.warning("downsampling %s failed; its raw rows stay: %s", node_id, exc)
        # One statement for every node's minutes past their keep.
        db.execute("DELETE FROM telemetry_minutes WHERE minute < ?", (aggregates_before,))
        return folded
    finally:
        db.close()


def _inflated_body(deflated: bytes) -> str | None:
    """SQLite's ``inflated_body(deflated)``: the JSON body of a frame stored deflated; NULL
    (nothing to fold) for bytes that do not inflate to one."""
    try:
        return inflated_body(deflated).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def _fold(db: Database, node_id: str, received_before: float) -> int:
    """Fold one node's raw rows in one transaction; how many there were."""
    with db.transaction():
        # The node's row first, as Store.add locks it: its bytes are counted again here.
        db.execute("SELECT 1 FROM nodes WHERE node_id = ?" + db.for_update, (node_id,))
        count, size = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM({STORED_SIZE}), 0) {_RAW}",
            (node_id, received_before),
        ).fetchone()
        if count:
            if isinstance(db, SqliteDatabase):
                db.execute(_FOLD_SQLITE, (node_id, received_before))
            else:
                _fold_postgres(db, node_id, received_before)
            db.execute(f"DELETE {_RAW}", (node_id, received_before))
            db.execute(
                "UPDATE nodes SET stored_bytes = stored_bytes - ? WHERE node_id = ?",
                (size, node_id),
            )
    return int(count)


def _fold_postgres(db: Database, node_id: str, received_before: float) -> None:
    """PostgreSQL's fold of one node's raw rows: those stored as text in one statement,
    those stored deflated inflated here (a row that does not inflate folds as nothing, as
    on SQLite) and folded a few dozen at a time."""
    db.execute(_FOLD_POSTGRES_TEXT, (node_id, node_id, received_before))
    rows = db.execute(
        f"SELECT deflated {_RAW} AND deflated IS NOT NULL", (node_id, received_before)
    ).fetchall()
    for start in range(0, len(rows), _INFLATED_AT_ONCE):
        chunk = (_inflated_body(bytes(d)) for (d,) in rows[start : start + _INFLATED_AT_ONCE])
        bodies = [body for body in chunk if body is not None]
        if bodies:
            db.execute(_FOLD_POSTGRES_INFLATED, (node_id, bodies))
