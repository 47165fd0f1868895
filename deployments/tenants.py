"""Tenants: who a request belongs to, and what it may use.

Every request is resolved to a `Tenant` before it does anything else, and everything per-tenant
(limits, fair share in the router's engine, ownership of stored responses, the `tenant` label of
metrics) keys on `Tenant.name`. Without tenants the service is open: every request is the anonymous
tenant `default`.

    Authorization: Bearer KEY -> TenantRegistry.authenticate -> Tenant (or 401)
    -> max_context_tokens (the ingress, locally) -> Limiter.admit: one call to the application's
    LimitCounters actor (requests/min, tokens/min, concurrent streams; or 429 + Retry-After)
    -> a Lease that the request's router streams hold -> released when the last one ends

Keys. The config holds only hashes (`sha256:<hex>`, `expertmesh hash-key`); a Kubernetes Secret
mounted at $EXPERTMESH_API_KEYS_DIR holds one file per tenant, named after it, with its keys (or
their hashes), one per line. A presented key is hashed and compared with every stored hash in
constant time (hmac.compare_digest, no early exit); keys are never logged or echoed.

Limits are shared by all ingress replicas of an application: one named, detached async actor
(`LimitCounters`) keeps a sliding 60-second window of admissions and of tokens per tenant and the
streams in flight. A stream is a lease with an expiry that its ingress replica renews while it
holds it, so the streams of a replica that dies are given back when their leases run out.
tokens_per_minute reserves the prompt plus max_tokens of every choice at admission (the request
is refused if that does not fit what is left of the window, so the limit is never exceeded, as
OpenAI counts max_tokens) and replaces the reservation with the tokens really used when it ends.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cluster.config import KEY_HASH, TENANT_NAME, ClusterConfig, TenantLimits
from deployments.protocol import APIError

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
KEYS_DIR_ENV = "EXPERTMESH_API_KEYS_DIR"
WINDOW_S = 60.0                  # the window of requests_per_minute and tokens_per_minute
LEASE_TTL_S = 30.0               # a stream's lease lapses this long after its replica last renewed it
LIMITS_NAMESPACE = "expertmesh"  # Ray namespace of the LimitCounters actors
OPEN_PATHS = ("/health", "/ready")


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0          # share of the router's engine when tenants compete
    limits: TenantLimits = field(default_factory=TenantLimits, compare=False)


ANONYMOUS = Tenant(DEFAULT_TENANT)


def tenant_of(request) -> Tenant:
    """The tenant the ingress resolved for this request (FastAPI `Request`), or the anonymous one."""
    return getattr(request.state, "tenant", ANONYMOUS)


# -- keys -------------------------------------------------------------------------------------------

def hash_key(key: str) -> str:
    """The form the config stores a key in: `sha256:<64 hex digits>`."""
    if not key or key != key.strip():
        raise ValueError("an API key must be non-empty and have no surrounding whitespace")
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "em-" + secrets.token_urlsafe(32)


def _digest(key_hash: str) -> bytes:
    return bytes.fromhex(key_hash.removeprefix("sha256:"))


def read_keys_dir(path: str | Path) -> dict[str, list[str]]:
    """Tenant name -> key hashes, from a directory with one file per tenant (a mounted Kubernetes
    Secret: key = tenant name, value = its keys, one per line, each a key or a `sha256:` hash).
    Hidden entries (the Secret volume's `..data` links) are skipped. Errors name the file and
    line, never its content."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"${KEYS_DIR_ENV} is {str(root)!r}, which is not a directory")
    tenants: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if not re.match(TENANT_NAME, entry.name):
            raise ValueError(f"{entry}: a key file is named after its tenant, and {entry.name!r} is not a "
                             f"tenant name (1-63 letters, digits, '.', '_' or '-')")
        hashes = []
        for number, line in enumerate(entry.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("sha256:"):
                if not re.match(KEY_HASH, line):
                    raise ValueError(f"{entry}, line {number}: a 'sha256:' line must be 'sha256:' and 64 "
                                     f"lowercase hex digits")
                hashes.append(line)
            else:
                hashes.append(hash_key(line))
        if not hashes:
            raise ValueError(f"{entry}: the key file of tenant {entry.name!r} holds no key")
        tenants[entry.name] = hashes
    return tenants


class TenantRegistry:
    """The tenants of one application and their key hashes; resolves an Authorization header."""

    def __init__(self, tenants: dict[str, Tenant], key_hashes: dict[str, list[str]]):
        self.tenants = tenants
        self._keys: list[tuple[bytes, str]] = []        # (sha256 digest, tenant name)
        owner: dict[bytes, str] = {}
        for name, hashes in key_hashes.items():
            if name not in tenants:
                raise ValueError(f"API keys are given for tenant {name!r}, which is not configured")
            for key_hash in hashes:
                digest = _digest(key_hash)
                if owner.get(digest, name) != name:
                    raise ValueError(f"tenants {owner[digest]!r} and {name!r} share an API key; "
                                     f"each key must name one tenant")
                owner[digest] = name
                self._keys.append((digest, name))

    @classmethod
    def from_config(cls, config: ClusterConfig, keys_dir: str | Path | None = None) -> "TenantRegistry":
        """The config's tenants plus those with key files in `keys_dir` (default: $EXPERTMESH_API_KEYS_DIR;
        a tenant only there gets weight 1 and no limits). Warns when that makes an open service."""
        keys_dir = keys_dir if keys_dir is not None else os.environ.get(KEYS_DIR_ENV) or None
        from_files = read_keys_dir(keys_dir) if keys_dir else {}
        tenants = {name: Tenant(name, spec.weight, spec.limits) for name, spec in config.tenants.items()}
        tenants.update({name: Tenant(name) for name in from_files if name not in tenants})
        hashes = {name: list(config.tenants[name].api_keys) if name in config.tenants else [] for name in tenants}
        for name, more in from_files.items():
            hashes[name] += more
        registry = cls(tenants, hashes)
        if registry.open:
            log.warning("no tenants are configured (config `tenants`, $%s): the API is OPEN, every "
                        "request is served without an API key", KEYS_DIR_ENV)
        for name in sorted(n for n, h in hashes.items() if not h):
            log.warning("tenant %r has no API key (config tenants.%s.api_keys or a key file): no request "
                        "can use it", name, name)
        return registry

    @property
    def open(self) -> bool:
        """No tenants: every request is served, as the anonymous tenant, without a key."""
        return not self.tenants

    def weight(self, name: str) -> float:
        tenant = self.tenants.get(name)
        return tenant.weight if tenant else 1.0

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant whose key `Authorization: Bearer <key>` carries; APIError 401 without a known
        key. An open service answers every request, key or not, as the anonymous tenant."""
        if self.open:
            return ANONYMOUS
        if not authorization or not authorization.strip():
            raise _unauthorized("You didn't provide an API key. Send it in the Authorization header: "
                                "'Authorization: Bearer YOUR_KEY'.")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, name in self._keys:             # every hash, no early exit: constant time
            if hmac.compare_digest(stored, digest):
                found = name
        if found is None:
            raise _unauthorized("Incorrect API key provided.")
        return self.tenants[found]


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


class TenantAuth:
    """ASGI middleware of the ingress app: `Authorization: Bearer <key>` -> `request.state.tenant`,
    or a 401 with OpenAI's error body. /health and /ready stay open. `registry` returns the
    replica's TenantRegistry (Serve builds the app before the replica's deployment object exists)."""

    def __init__(self, app, registry: Callable[[], TenantRegistry]):
        self.app = app
        self.registry = registry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path not in OPEN_PATHS:
            try:
                tenant = self.registry().authenticate(_header(scope, b"authorization"))
            except APIError as error:
                from fastapi.responses import JSONResponse

                return await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(
                    scope, receive, send)
            # A dict of this request's own: the server may share the one it put in the scope.
            scope["state"] = {**(scope.get("state") or {}), "tenant": tenant}
        await self.app(scope, receive, send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# -- limits shared by all ingress replicas ----------------------------------------------------------

@dataclass
class _Admission:
    tenant: str
    time: float
    tokens: int                  # reserved at admission; what was used, once released


@dataclass
class _Held:
    admission: _Admission
    expires: float


class LimitCounters:
    """The shared state of one application's tenant limits (run as a named, detached async Ray
    actor; a plain class, so that it is tested with a clock of the test's own).

    Per tenant: admissions and their tokens in a sliding window, and the leases (streams) in flight.
    `admit` checks every limit and records the admission in one call, so two ingress replicas can
    never both take the last slot. The limits come with each call: a redeployed config applies at
    once, and this state holds only counts."""

    def __init__(self, window_s: float = WINDOW_S, lease_ttl_s: float = LEASE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s, self.lease_ttl_s, self.clock = window_s, lease_ttl_s, clock
        self._admissions: dict[str, deque[_Admission]] = defaultdict(deque)
        self._leases: dict[str, _Held] = {}
        self._streams: dict[str, int] = defaultdict(int)

    async def admit(self, tenant: str, limits: dict[str, int | None], tokens: int) -> dict:
        """Admit a request that may use `tokens` (prompt + max_tokens), or say which limit refuses it.
        Returns {"lease": id} or {"limit": name, "message": ..., "retry_after_s": seconds}."""
        now = self.clock()
        self._expire(now)
        window = self._admissions[tenant]
        while window and window[0].time <= now - self.window_s:
            window.popleft()

        rpm = limits.get("requests_per_minute")
        if rpm is not None and len(window) >= rpm:
            return self._refuse("requests_per_minute", window[len(window) - rpm].time + self.window_s - now,
                                f"Rate limit reached for tenant {tenant!r}: {rpm} requests per minute "
                                f"(requests_per_minute).")
        streams = limits.get("max_concurrent_streams")
        if streams is not None and self._streams[tenant] >= streams:
            return self._refuse("max_concurrent_streams", 1.0,
                                f"Concurrency limit reached for tenant {tenant!r}: {streams} requests in "
                                f"flight at once (max_concurrent_streams); retry when one ends.")
        tpm = limits.get("tokens_per_minute")
        if tpm is not None:
            if tokens > tpm:
                return self._refuse("tokens_per_minute", self.window_s,
                                    f"Request too large for tenant {tenant!r}: it may use {tokens} tokens (prompt "
                                    f"plus max_tokens of every choice), more than its {tpm} tokens per minute "
                                    f"(tokens_per_minute). Lower max_tokens.")
            used = sum(a.tokens for a in window)
            if used + tokens > tpm:
                freed, wait = 0, self.window_s
                for a in window:             # the earliest time enough of the window has passed
                    freed += a.tokens
                    if used - freed + tokens <= tpm:
                        wait = a.time + self.window_s - now
                        break
                return self._refuse("tokens_per_minute", wait,
                                    f"Rate limit reached for tenant {tenant!r}: {tpm} tokens per minute "
                                    f"(tokens_per_minute); {used} used in the last minute, this request may "
                                    f"use {tokens} (prompt plus max_tokens).")

        admission = _Admission(tenant, now, tokens)
        window.append(admission)
        lease = uuid.uuid4().hex
        self._leases[lease] = _Held(admission, now + self.lease_ttl_s)
        self._streams[tenant] += 1
        return {"lease": lease}

    async def release(self, lease: str, used_tokens: int | None = None) -> None:
        """The request ended; it used `used_tokens` (prompt + completion) in all (None: keep the reservation)."""
        held = self._leases.pop(lease, None)
        if held is None:             # expired already, or admitted by an earlier incarnation of this actor
            return
        self._streams[held.admission.tenant] -= 1
        if used_tokens is not None:
            held.admission.tokens = used_tokens

    async def renew(self, leases: list[str]) -> None:
        """The ingress replica holding these leases is alive: extend them."""
        expires = self.clock() + self.lease_ttl_s
        for lease in leases:
            if lease in self._leases:
                self._leases[lease].expires = expires

    async def usage(self, tenant: str) -> dict:
        """What `tenant` has used (tests and operators read it)."""
        now = self.clock()
        self._expire(now)
        window = [a for a in self._admissions[tenant] if a.time > now - self.window_s]
        return {"requests": len(window), "tokens": sum(a.tokens for a in window),
                "streams": self._streams[tenant]}

    def _expire(self, now: float) -> None:
        """Leases not renewed in time belong to a replica that died: give their streams back (their
        tokens stay reserved, since what they used is unknown)."""
        for lease in [lease for lease, held in self._leases.items() if held.expires <= now]:
            held = self._leases.pop(lease)
            self._streams[held.admission.tenant] -= 1
            log.warning("a stream lease of tenant %r lapsed: its ingress replica stopped renewing it",
                        held.admission.tenant)

    @staticmethod
    def _refuse(limit: str, retry_after_s: float, message: str) -> dict:
        return {"limit": limit, "message": message, "retry_after_s": max(1, math.ceil(retry_after_s))}


SHARED_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_streams")


def _shared_limits(tenant: Tenant) -> dict[str, int]:
    """The limits of `tenant` that need the shared counters (max_context_tokens needs none)."""
    return {name: value for name in SHARED_LIMITS if (value := getattr(tenant.limits, name)) is not None}


class Limiter:
    """One ingress replica's side of the shared limits: `admit` (one actor call) gives a `Lease`
    the request's router streams hold; a task renews the leases this replica holds. Tenants
    without a shared limit never reach the actor."""

    def __init__(self, app_name: str, tenants: Iterable[Tenant] = (),
                 on_rejection: Callable[[str, str], None] = lambda tenant, limit: None):
        self.actor_name = f"expertmesh-limits-{app_name}"
        self.on_rejection = on_rejection
        self._actor = None
        self._leases: dict[str, Lease] = {}
        self._renewing: asyncio.Task | None = None
        if any(_shared_limits(t) for t in tenants):
            self.actor()            # now, while the replica starts, not in its first request

    def actor(self):
        """The application's LimitCounters actor, created by the first replica that needs it."""
        if self._actor is None:
            import ray

            self._actor = ray.remote(LimitCounters).options(
                name=self.actor_name, namespace=LIMITS_NAMESPACE, get_if_exists=True, lifetime="detached",
                num_cpus=0, max_restarts=-1).remote()
        return self._actor

    async def admit(self, tenant: Tenant, tokens: int) -> "Lease | None":
        """Admit a request of `tenant` that may use `tokens` (its prompts plus max_tokens per choice);
        APIError 429 with Retry-After when a limit refuses it. None when the tenant has no shared limit."""
        limits = _shared_limits(tenant)
        if not limits:
            return None
        answer = await self.actor().admit.remote(tenant.name, limits, tokens)
        if "limit" in answer:
            self.on_rejection(tenant.name, answer["limit"])
            raise APIError(429, answer["message"], code="rate_limit_exceeded",
                           headers={"Retry-After": str(answer["retry_after_s"])})
        lease = Lease(self, answer["lease"])
        self._leases[lease.id] = lease
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew())
        return lease

    def rejected(self, tenant: Tenant, limit: str) -> None:
        """Count a refusal decided here (max_context_tokens)."""
        self.on_rejection(tenant.name, limit)

    def _release(self, lease: "Lease", used_tokens: int) -> None:
        self._leases.pop(lease.id, None)
        self.actor().release.remote(lease.id, used_tokens)     # fire and forget: nobody waits on it

    async def _renew(self) -> None:
        while self._leases:
            await asyncio.sleep(LEASE_TTL_S / 3)
            try:
                await self.actor().renew.remote(list(self._leases))
            except Exception as error:      # the actor restarts; leases it lost are simply gone
                log.warning("renewing stream leases failed: %r", error)


class Lease:
    """One admitted request. Its router streams are wrapped by `wrap`; when the last of them ends
    (finished, failed or cancelled) the lease is released with the tokens the request used."""

    def __init__(self, limiter: Limiter, lease_id: str):
        self.limiter, self.id = limiter, lease_id
        self._used: dict[int, int] = {}          # stream -> prompt + completion tokens so far
        self._open: set[int] = set()
        self._ids = itertools.count()
        self.released = False

    def wrap(self, stream) -> "_LeasedStream":
        index = next(self._ids)
        self._open.add(index)
        return _LeasedStream(stream, self, index)

    def _observe(self, index: int, output: Any) -> None:
        self._used[index] = output.prompt_tokens + output.completion_tokens

    def _close(self, index: int) -> None:
        self._open.discard(index)
        if not self._open:
            self.release()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self, sum(self._used.values()))


class _LeasedStream:
    """A router stream (Serve's response generator) that tells its lease what it used and when it ended."""

    def __init__(self, stream, lease: Lease, index: int):
        self._stream, self._lease, self._index = stream, lease, index

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            output = await self._stream.__anext__()
        except BaseException:
            self._lease._close(self._index)
            raise
        self._lease._observe(self._index, output)
        if output.finished:
            self._lease._close(self._index)
        return output

    def cancel(self) -> None:
        self._stream.cancel()
        self._lease._close(self._index)

    def __del__(self):          # a run dropped unconsumed (its client left first) gives its stream back
        lease = getattr(self, "_lease", None)
        if lease is not None and not lease.released:
            lease._close(self._index)
