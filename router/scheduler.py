"""Continuous batching: waiting and running queues, a per-step token budget,
chunked prefill mixed with decodes, preemption by recompute, abort at any time.
The waiting queue is served by weighted fair share across tenants (`FairQueue`)."""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

from router.kv_cache import BlockManager
from router.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int            # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's known tokens, so the next token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class FairQueue:
    """The waiting queue, served by weighted fair share across tenants: start-time fair queuing
    on the tokens the engine computes.

    Each tenant's virtual time is the tokens scheduled for it (prefill chunks and decodes, charged
    as each step is scheduled) divided by its weight; the next sequence admitted is the head of the waiting tenant with the least virtual
    time (ties: the earlier arrival), first come first served within a tenant. A tenant with no
    sequence in the engine that sends one starts at the virtual time of the tenants being served,
    so idling banks no credit, and a newcomer is served at once however long another's queue is.
    With one tenant this is the plain FIFO queue.
    """

    def __init__(self):
        self._queues: dict[str | None, deque[Sequence]] = {}   # tenant -> its waiting sequences
        self._vtime: dict[str | None, float] = {}
        self._weight: dict[str | None, float] = {}
        self._in_engine: Counter = Counter()                    # tenant -> sequences waiting or running
        self._now = 0.0                                         # virtual time of the tenants being served

    def arrive(self, seq: Sequence, weight: float = 1.0) -> None:
        """A new request joins the queue."""
        tenant = seq.tenant
        if weight <= 0:
            raise ValueError(f"a tenant's weight must be > 0, got {weight}")
        self._weight[tenant] = weight
        if not self._in_engine[tenant]:
            self._vtime[tenant] = max(self._vtime.get(tenant, 0.0), self._now)
        self._in_engine[tenant] += 1
        self.append(seq)

    def depart(self, seq: Sequence) -> None:
        """A request left the engine (finished or aborted)."""
        self._in_engine[seq.tenant] -= 1
        if self._in_engine[seq.tenant] <= 0:
            del self._in_engine[seq.tenant]

    def charge(self, tenant: str | None, num_tokens: int) -> None:
        """This step computes `num_tokens` for `tenant`."""
        self._vtime[tenant] = self._vtime.get(tenant, self._now) + num_tokens / self._weight.get(tenant, 1.0)
        active = [self._vtime[t] for t in self._in_engine if t in self._vtime]
        if active:
            self._now = max(self._now, min(active))

    def append(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.tenant, deque()).append(seq)

    def appendleft(self, seq: Sequence) -> None:
        """Back to the front of its tenant's queue (a preempted sequence)."""
        self._queues.setdefault(seq.tenant, deque()).appendleft(seq)

    def peek(self) -> Sequence:
        """The sequence to admit next."""
        tenant = min((t for t, q in self._queues.items() if q),
                     key=lambda t: (self._vtime.get(t, self._now), self._queues[t][0].arrival_time))
        return self._queues[tenant][0]

    def popleft(self) -> Sequence:
        seq = self.peek()
        self._queues[seq.tenant].popleft()
        return seq

    def remove(self, seq: Sequence) -> None:
        self._queues[seq.tenant].remove(seq)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Sequence]:
        for queue in list(self._queues.values()):
            yield from list(queue)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = FairQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, weight: float = 1.0) -> None:
        """Queue a new sequence; `weight` is its tenant's fair share (see FairQueue)."""
        self.waiting.arrive(seq, weight)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.finish(seq, "abort")
                    return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.block_manager.free_sequence(seq)
        self.waiting.depart(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False

        # Running sequences first, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            total = seq.num_computed_tokens + n
            while not self.block_manager.can_allocate(seq, total):
                victim = self.running.pop()      # the youngest gives its blocks back
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.block_manager.allocate(seq, total)
            scheduled.append(ScheduledSeq(seq, n))
            self.waiting.charge(seq.tenant, n)
            budget -= n
            i += 1

        # Then admit waiting sequences while budget, slots and blocks allow.
        # After a preemption nothing new is admitted: memory is already short.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()                # the fair-share pick across tenants
            prefix = self.block_manager.match_prefix(seq)
            computed = len(prefix) * self.block_manager.block_size
            n = min(seq.num_tokens - computed, budget)
            if not self.block_manager.can_allocate(seq, computed + n, prefix):
                break
            self.waiting.popleft()
            self.block_manager.record_prefix_lookup(seq, len(prefix))
            self.block_manager.allocate(seq, computed + n, prefix)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            self.waiting.charge(seq.tenant, n)       # at once, so the next pick this step sees it
            budget -= n
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Free all of `seq`'s blocks; it will recompute its tokens (often from the prefix cache)."""
        self.block_manager.free_sequence(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def after_step(self, batch: list[ScheduledSeq]) -> None:
        """Account the computed tokens; blocks that became full join the prefix cache."""
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            self.block_manager.register_computed(item.seq)

    def remove_finished(self) -> None:
        self.running = [s for s in self.running if s.status is Status.RUNNING]
