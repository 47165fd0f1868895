"""Stop strings on streamed text.

The rule, the same however the text is cut into deltas: generation stops at the stop string
that starts earliest in the text (the shortest one when several start at the same place),
and the output is the text before it (plus the stop string with include_stop_str_in_output).

Streaming needs two kinds of patience to keep that rule:
- a tail that could be the beginning of a stop string is held back, so a stop string split
  across deltas is never emitted;
- a complete stop string is acted on only once no stop string could still complete at an
  earlier start (stops "abcd" and "bc" on "abc" wait for the next character).
"""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...], include_stop_str_in_output: bool = False):
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self.matched_stop: str | None = None   # which stop string ended the text (OpenAI's stop_reason)
        self._pending = ""                     # received but not yet emitted
        self._longest = max((len(s) for s in stop), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next delta; return (text safe to emit now, stopped). After a stop, all is discarded."""
        if self.stopped:
            return "", True
        self._pending += delta
        hold = self._partial_start()
        match = self._earliest_match()
        if match is not None and match[0] <= hold:
            return self._finish(*match), True
        emit, self._pending = self._pending[:hold], self._pending[hold:]
        return emit, False

    def flush(self) -> str:
        """At the end of generation: the held-back text, cut at a stop string still waiting on more text."""
        if self.stopped:
            return ""
        match = self._earliest_match()
        if match is not None:
            return self._finish(*match)
        text, self._pending = self._pending, ""
        return text

    # -- helpers --

    def _earliest_match(self) -> tuple[int, str] | None:
        """(start, stop string) of the complete occurrence starting earliest, shortest on ties."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            start = self._pending.find(s)
            if start >= 0 and (best is None or (start, len(s)) < best[:2]):
                best = (start, len(s), s)
        return None if best is None else (best[0], best[2])

    def _partial_start(self) -> int:
        """The earliest position from which the pending text is a proper prefix of a stop string
        (a stop that could still complete with more text); len(pending) if there is none."""
        text = self._pending
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            tail = text[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return start
        return len(text)

    def _finish(self, start: int, stop: str) -> str:
        text = self._pending[:start] + (stop if self.include_stop_str_in_output else "")
        self._pending = ""
        self.stopped, self.matched_stop = True, stop
        return text
