"""Tenants: who a request belongs to.

The seam the rest of the ingress builds on: every request is resolved to a `Tenant` before it does
anything else, and everything per-tenant (limits, fair share in the router's engine, ownership of
stored responses, the `tenant` label of metrics) keys on `Tenant.name`. Without tenants in the
config every request is the anonymous tenant `default`.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0          # share of the router's engine when tenants compete


ANONYMOUS = Tenant(DEFAULT_TENANT)


def tenant_of(request) -> Tenant:
    """The tenant the ingress resolved for this request (FastAPI `Request`), or the anonymous one."""
    return getattr(request.state, "tenant", ANONYMOUS)
