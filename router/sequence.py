"""One request inside the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # prompt + generated so far
    status: Status = Status.WAITING
    num_computed_tokens: int = 0      # tokens whose keys/values are in the KV cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0        # leading blocks registered in the prefix cache
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None   # its first step began (the end of its queue time)
    first_token_time: float | None = None
    tenant: str | None = None

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
