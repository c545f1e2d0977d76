"""Print the JSON Schema of every wire message: ``python scripts/gen_protocol_schema.py``.

The output is committed as ``docs/protocol.schema.json``; tests/unit/test_protocol_schema.py
fails when it and the types in :mod:`agent.protocol.messages` drift apart.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.protocol.limits import PROTOCOL_VERSION
from agent.protocol.messages import Message

__all__ = ["render"]


def render() -> str:
    """The schema document, as committed."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"gpu-agent wire protocol v{PROTOCOL_VERSION}: one frame",
        **msgspec.json.schema(Message),
    }
    return json.dumps(_clean(schema), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _clean(node: Any) -> Any:
    """Every ``description`` as :func:`inspect.cleandoc` gives it.

    msgspec copies docstrings into descriptions, and how it indents them changed between
    releases (0.22 and 0.23); the committed schema must not depend on that.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean(item) for item in node]
    return node


if __name__ == "__main__":
    sys.stdout.write(render())
