"""Continuous batching: waiting and running queues, a per-step token budget,
chunked prefill mixed with decodes, preemption by recompute, abort at any time."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

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
            budget -= n
            i += 1

        # Then admit waiting sequences while budget, slots and blocks allow.
        # After a preemption nothing new is admitted: memory is already short.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
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
