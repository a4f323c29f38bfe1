"""Client-wide pacing shared by all worker threads: requests/s, tokens/min, and pauses after a 429."""

import threading
import time
from collections import deque

WINDOW_S = 60.0
# Requests are paced at 97% of requests_per_second: R+1 evenly spaced requests then span 1.03 s, so up to 30 ms of
# network jitter cannot squeeze them into one 1 s window of a provider counting "R per second".
HEADROOM = 0.97
RECHECK_S = 1.0  # a waiting thread re-reads the clock at least this often


class Limiter:
    """Requests start evenly spaced at HEADROOM * requests_per_second (no bursts); the tokens of the requests started
    in any 60 s window stay within tokens_per_minute (estimated before sending, corrected with `usage` by `settle`);
    `pause` holds every thread back, e.g. for a 429's Retry-After; `cancel` releases every waiting thread for good.
    A limit of 0 is no limit. `clock` is time.monotonic (tests pass one they can move)."""

    def __init__(self, requests_per_second=0, tokens_per_minute=0, clock=time.monotonic):
        self.clock = clock
        self.interval = 1.0 / (HEADROOM * requests_per_second) if requests_per_second else 0.0
        self.tokens_per_minute = tokens_per_minute or 0
        self._changed = threading.Condition()
        self._next_start = 0.0
        self._resume_at = 0.0
        self._window: deque[list] = deque()  # [start time, tokens, live] of requests started in the last WINDOW_S
        self._window_tokens = 0
        self._cancelled = False

    def acquire(self, tokens: int) -> list | None:
        """Block until a request of `tokens` may start; return its ticket for `settle` (None once cancelled)."""
        with self._changed:
            while True:
                if self._cancelled:
                    return None
                now = self.clock()
                wait = max(self._resume_at, self._next_start) - now
                if wait <= 0 and self.tokens_per_minute:
                    wait = self._token_wait(now, tokens)
                if wait <= 0:
                    self._next_start = max(self._next_start, now) + self.interval
                    ticket = [now, tokens, True]
                    if self.tokens_per_minute:
                        self._window.append(ticket)
                        self._window_tokens += tokens
                    return ticket
                self._changed.wait(min(wait, RECHECK_S))  # woken early when a settle frees tokens

    def settle(self, ticket: list, tokens: int) -> None:
        """Replace a request's estimate with the tokens it really used (0 if it was refused)."""
        with self._changed:
            if ticket[2]:
                self._window_tokens += tokens - ticket[1]
            ticket[1] = tokens
            self._changed.notify_all()

    def pause(self, seconds: float) -> None:
        with self._changed:
            self._resume_at = max(self._resume_at, self.clock() + seconds)

    def cancel(self) -> None:
        """Wake every waiting thread (and any later one) with no ticket: the stage is stopping."""
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()

    def _token_wait(self, now: float, tokens: int) -> float:
        while self._window and self._window[0][0] <= now - WINDOW_S:
            expired = self._window.popleft()
            expired[2] = False
            self._window_tokens -= expired[1]
        excess = self._window_tokens + tokens - self.tokens_per_minute
        if excess <= 0 or not self._window:  # a request larger than the whole budget goes alone
            return 0.0
        for start, used, _ in self._window:  # wait until enough of the oldest requests leave the window
            excess -= used
            if excess <= 0:
                return start + WINDOW_S - now
        return self._window[-1][0] + WINDOW_S - now
