"""Session affinity: every turn of a conversation goes to the router replica that served the last one.

A router replica's prefix cache holds the KV blocks of the conversations it served, and a
conversation's next turn repeats all earlier turns as its prompt prefix: on the replica that served
the previous turn most of that prefill is a cache hit, on any other replica it is computed again.
Serve's default request router (power of two choices) picks by load alone, so with R replicas a
turn finds its prefix about 1/R of the time.

`SessionAffinityRouter` is the Serve request router of the Router deployment. A request that names
its conversation (the `session` keyword of `Router.generate`: the Responses API's conversation, or
a chat or completion request's `prompt_cache_key`) goes to the conversation's home replica, chosen
by rendezvous (highest random weight) hashing over the live replica ids: every ingress replica
computes the same home without shared state, and a replica joining or leaving moves only the
conversations it takes over or held, never one between two other replicas. The home is passed over
for power of two choices when it already has `spill_at` requests in flight (its batch is full, so
the turn would queue behind others while another replica has room), when Serve finds it full, or
when it does not answer. Requests without a conversation (info, stats, one-off requests) are routed
by power of two choices, as Serve's default does.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Iterable

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SESSION_KWARG = "session"        # the keyword of Router.generate that names the conversation


def conversation_of(request: PendingRequest | None) -> str | None:
    """The conversation a routed call continues, or None. Only keyword arguments are read, so
    `Router.generate` takes `session` by keyword only: a positional one could not be seen here."""
    if request is None:
        return None
    session = request.kwargs.get(SESSION_KWARG)
    return session if isinstance(session, str) and session else None


def weight(session: str, replica_id: str) -> int:
    """The rendezvous weight of a replica for a conversation: a hash stable across processes
    (Python's own `hash` of a str differs from one process to the next)."""
    digest = hashlib.blake2b(f"{session}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home_of(session: str, replica_ids: Iterable[str]) -> str:
    """The replica id with the highest weight for `session`: the conversation's home."""
    return max(replica_ids, key=lambda replica_id: weight(session, replica_id))


def power_of_two(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Two random replicas; Serve sends the request to the one with the shorter queue."""
    return random.sample(replicas, min(2, len(replicas)))


class SessionAffinityRouter(RequestRouter):
    """Requests of one conversation to its home replica; everything else by power of two choices.

    Serve tries the ranks `choose_replicas` returns in order and takes a replica of the first rank
    that has room (fewer than `max_ongoing_requests` in flight) and answers its queue-length probe.
    Without FIFOMixin, Serve hands a chosen replica to exactly the request it was chosen for.
    """

    spill_at: int | None = None

    def initialize_state(self, spill_at: int | None = None, **kwargs: Any) -> None:
        """`spill_at`: requests in flight at the home replica from which a conversation's turn is
        routed by load instead; None: only a full or silent home is passed over."""
        if kwargs:
            raise TypeError(f"SessionAffinityRouter got unknown request_router_kwargs: {sorted(kwargs)}")
        if spill_at is not None and spill_at < 1:
            raise ValueError(f"spill_at must be at least 1, got {spill_at}")
        self.spill_at = spill_at

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Each round already offers every replica, so Serve may back off between rounds.
            pending_request.routing_context.should_backoff = True
        by_load = power_of_two(candidate_replicas)
        session = conversation_of(pending_request)
        if session is None or not candidate_replicas:
            return [by_load]
        home_id = home_of(session, (r.replica_id.unique_id for r in candidate_replicas))
        home = next(r for r in candidate_replicas if r.replica_id.unique_id == home_id)
        if self.spill_at is not None:
            in_flight = await self._in_flight(home)
            if in_flight is None or in_flight >= self.spill_at:      # silent, or its batch is full
                return [by_load]
        return [[home], by_load]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Hand `replica` to the request it was chosen for: the pending request whose metadata this
        is. Serve's own out-of-order matching looks requests up by `internal_request_id`, which the
        calls one ingress request makes all share (the `n` choices of a chat completion): it then
        finds none of them but the last, and the others wait for ever. Matching the metadata object
        itself is exact; Serve's lookup remains the fallback."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                by_id = self._pending_requests_by_id          # indexes one request per shared id
                if by_id.get(request_metadata.internal_request_id) is pending:
                    del by_id[request_metadata.internal_request_id]
                return
        super()._fulfill_next_pending_request(replica, request_metadata)

    async def _in_flight(self, replica: RunningReplica) -> int | None:
        """Requests in flight at the replica as far as this handle knows: Serve's queue-length
        cache (this handle's sends, the replica's answers) or, when that is stale, a probe as Serve
        makes before sending. None: no answer. A burst of requests routed in the same instant can
        overshoot `spill_at`, since the cache counts a request only once it is sent."""
        in_flight = self.replica_queue_len_cache.get(replica.replica_id)
        if in_flight is None:
            [(_, in_flight)] = await self._probe_queue_lens([replica], 0)
        return in_flight


def request_router_config(spill_at: int | None) -> RequestRouterConfig:
    """The Router deployment's `request_router_config` with session affinity."""
    return RequestRouterConfig(request_router_class=SessionAffinityRouter,
                               request_router_kwargs={"spill_at": spill_at})
