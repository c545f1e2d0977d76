"""Telemetry downsampling: raw batches for a window, then per-minute aggregates per GPU.

At 10,000 agents the raw telemetry is ~56 MB every second; kept raw for days it would fill
any disk. Past :attr:`Settings.telemetry_raw_s` each node's raw batches become one row per
(minute, GPU, metric) in ``telemetry_minutes`` (min, mean, max and the count of samples) and
the raw rows go. The minute is the sample's own ``taken_at``; every numeric reading of a
GPU is a metric (``unsupported``/``unavailable`` readings, strings and lists are not).

The work is SQLite's (its JSON functions over the stored text; no Python object per
sample) on a thread of its own, with its own connection, one short transaction per node:
the event loop never waits for it, and the group-commit writer waits at most one node's
transaction. That connection commits with ``synchronous=NORMAL``: a transaction both writes
the aggregates and deletes their rows, so a power loss undoes both or neither, and nothing
of it was ever acknowledged to anyone.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["SCHEMA", "downsample"]

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
_FOLD = """
INSERT INTO telemetry_minutes (node_id, minute, gpu, metric, min, mean, max, samples)
SELECT ?1, CAST(json_extract(s.value, '$.taken_at') / 60 AS INTEGER) * 60 AS minute,
       json_extract(g.value, '$.id') AS gpu, k.key AS metric,
       MIN(k.value), AVG(k.value), MAX(k.value), COUNT(*)
FROM (SELECT body FROM messages
      WHERE node_id = ?1 AND type = 'telemetry' AND received < ?2) AS m,
     json_each(m.body, '$.samples') AS s,
     json_each(s.value, '$.gpus') AS g,
     json_each(g.value) AS k
WHERE k.type IN ('integer', 'real')
  AND json_type(s.value, '$.taken_at') IN ('integer', 'real')
  AND json_type(g.value, '$.id') = 'text'
GROUP BY minute, gpu, metric
ON CONFLICT (node_id, minute, gpu, metric) DO UPDATE SET
    min = MIN(min, excluded.min),
    max = MAX(max, excluded.max),
    mean = (mean * samples + excluded.mean * excluded.samples) / (samples + excluded.samples),
    samples = samples + excluded.samples
"""


def downsample(path: Path, received_before: float, aggregates_before: float) -> int:
    """Fold every node's raw telemetry received before ``received_before`` into per-minute
    aggregates, and delete the aggregates of minutes before ``aggregates_before``; returns
    how many raw rows were folded. Opens its own connection: run it on a thread."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        db.execute("PRAGMA synchronous=NORMAL")
        folded = 0
        # A transaction only for the nodes that have raw rows to fold (the others would
        # take the write lock for nothing).
        nodes = db.execute(
            "SELECT n.node_id FROM nodes n WHERE EXISTS (SELECT 1 FROM messages m"
            " WHERE m.node_id = n.node_id AND m.type = 'telemetry' AND m.received < ?)",
            (received_before,),
        ).fetchall()
        for (node_id,) in nodes:
            db.execute("BEGIN IMMEDIATE")
            try:
                count, size = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(length(CAST(body AS BLOB))), 0) {_RAW}",
                    (node_id, received_before),
                ).fetchone()
                if count:
                    db.execute(_FOLD, (node_id, received_before))
                    db.execute(f"DELETE {_RAW}", (node_id, received_before))
                    db.execute(
                        "UPDATE nodes SET stored_bytes = stored_bytes - ? WHERE node_id = ?",
                        (size, node_id),
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            folded += int(count)
        # One statement for every node's minutes past their keep.
        db.execute("DELETE FROM telemetry_minutes WHERE minute < ?", (aggregates_before,))
        return folded
    finally:
        db.close()
