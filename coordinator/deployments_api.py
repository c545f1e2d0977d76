"""The API's deployment routes: the list and one deployment's view (read from the store),
and deploy and undeploy behind the admin token (through
:class:`coordinator.deployments.Deployments`).

- ``GET /api/deployments`` -> ``{"deployments": [view, ...]}``, by name
- ``GET /api/deployments/{name}`` -> the view; 404 ``unknown_deployment``
- ``POST /api/deployments`` ``{"name", "spec", "replicas"}`` -> 201 the view
- ``POST /api/deployments/{name}/scale`` ``{"replicas"}`` -> 200 the view
- ``DELETE /api/deployments/{name}`` -> 202 ``{"name", "cancelled": [job id, ...]}``

A view: ``name``, ``replicas`` (wanted), ``ready`` (how many are), ``image``, ``models``,
``lease_s``, ``created``, ``failures`` (in a row) and ``hold_until`` (placements held back
until then), ``live`` (each replica's ``job_id``, ``node_id``, ``connected``, ``state``,
``code``, ``created``, ``renewed_until``) and ``retired`` (the newest, each with
``retired`` and ``retired_code``: ``node_lost``, ``rebalanced`` or the final state of
its job).
"""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus
from typing import Any, TypeVar

import msgspec

from coordinator.api_util import HttpAnswer, coded_error, json_answer
from coordinator.deployments import Deployments
from coordinator.deployments_store import DeploymentRow
from coordinator.errors import JobError
from coordinator.store import Store

__all__ = ["create", "delete", "detail", "listing", "scale", "view"]


class _Deploy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Any
    spec: Any
    replicas: Any
    registry_logins: Any = None


class _Scale(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replicas: Any


_Request = TypeVar("_Request", _Deploy, _Scale)


def listing(store: Store, connected: Collection[str]) -> HttpAnswer:
    """``GET /api/deployments``."""
    rows = store.deployments.all()
    return json_answer({"deployments": [view(store, row, connected) for row in rows]})


def detail(store: Store, name: str, connected: Collection[str]) -> HttpAnswer:
    """``GET /api/deployments/{name}``."""
    row = store.deployments.get(name)
    if row is None:
        return coded_error(HTTPStatus.NOT_FOUND, "unknown_deployment", f"no deployment {name!r}")
    return json_answer(view(store, row, connected))


async def create(deployments: Deployments, store: Store, body: bytes) -> HttpAnswer:
    """``POST /api/deployments``.

    Raises:
        JobError: as :meth:`Deployments.deploy`, or ``bad_request``.
    """
    request = _decode(body, _Deploy)
    row = await deployments.deploy(
        request.name, request.spec, request.replicas, request.registry_logins
    )
    return json_answer(view(store, row, ()), HTTPStatus.CREATED)


async def scale(deployments: Deployments, store: Store, name: str, body: bytes) -> HttpAnswer:
    """``POST /api/deployments/{name}/scale``.

    Raises:
        JobError: as :meth:`Deployments.scale`, or ``bad_request``.
    """
    request = _decode(body, _Scale)
    row = await deployments.scale(name, request.replicas)
    return json_answer(view(store, row, ()))


def _decode(body: bytes, kind: type[_Request]) -> _Request:
    """A request's body as ``kind``; ``JobError`` ``bad_request`` if it is not one."""
    try:
        return msgspec.json.decode(body or b"null", type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise JobError("bad_request", str(exc)) from None
    except RecursionError:  # msgspec's own limit: a spec of nested brackets
        raise JobError("bad_request", "the body is nested too deeply") from None


async def delete(deployments: Deployments, name: str) -> HttpAnswer:
    """``DELETE /api/deployments/{name}``.

    Raises:
        JobError: ``unknown_deployment``.
    """
    cancelled = await deployments.undeploy(name)
    return json_answer({"name": name, "cancelled": cancelled}, HTTPStatus.ACCEPTED)


def view(store: Store, row: DeploymentRow, connected: Collection[str]) -> dict[str, Any]:
    """What the API shows of one deployment."""
    table = store.deployments
    live = table.replicas(row.name)
    service = row.spec.get("service")
    return {
        "name": row.name,
        "replicas": row.replicas,
        "ready": sum(1 for r in live if r.state == "ready"),
        "image": row.spec.get("image"),
        "registry_logins": sorted(row.registry_logins),  # the hosts: never a password
        "models": service.get("models", []) if isinstance(service, dict) else [],
        "lease_s": row.lease_s,
        "created": row.created,
        "failures": row.failures,
        "hold_until": row.hold_until,
        "live": [
            {
                "job_id": r.job_id,
                "node_id": r.node_id,
                "connected": r.node_id in connected,
                "state": r.state,
                "code": r.code,
                "created": r.created,
                "renewed_until": r.renewed_until,
            }
            for r in live
        ],
        "retired": [
            {
                "job_id": r.job_id,
                "node_id": r.node_id,
                "state": r.state,
                "code": r.code,
                "retired": r.retired,
                "retired_code": r.retired_code,
            }
            for r in table.replicas(row.name, retired=True)
        ],
    }
