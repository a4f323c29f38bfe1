"""The client-wide limiter: tokens/min budgets are estimated before a request and corrected with its usage after."""

import threading

from nlistral.llm.limiter import Limiter


def _acquire_in_thread(limiter, tokens) -> threading.Thread:
    thread = threading.Thread(target=limiter.acquire, args=(tokens,), daemon=True)
    thread.start()
    return thread


def test_token_budget_holds_requests_until_usage_frees_it():
    limiter = Limiter(tokens_per_minute=1000)
    first = limiter.acquire(800)  # the estimate: prompt + max_tokens
    waiting = _acquire_in_thread(limiter, 400)
    waiting.join(0.3)
    assert waiting.is_alive()  # 800 + 400 > 1000 within the minute
    limiter.settle(first, 300)  # the reply's usage: 300 tokens
    waiting.join(5)
    assert not waiting.is_alive()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_request_over_the_whole_budget_waits_for_an_empty_window_then_goes():
    clock = Clock()
    limiter = Limiter(tokens_per_minute=100, clock=clock)
    assert limiter.acquire(500)  # alone in the window: allowed, or it could never run
    waiting = _acquire_in_thread(limiter, 10)
    waiting.join(0.3)
    assert waiting.is_alive()  # the window still holds the 500
    clock.now += 59
    waiting.join(1.5)
    assert waiting.is_alive()  # a second before the 500 leave the window
    clock.now += 2
    waiting.join(30)  # the waiting thread re-reads the clock within a second
    assert not waiting.is_alive()


def test_refused_request_gives_its_tokens_back():
    limiter = Limiter(tokens_per_minute=1000)
    refused = limiter.acquire(900)
    limiter.settle(refused, 0)  # a 429: nothing was processed
    waiting = _acquire_in_thread(limiter, 900)
    waiting.join(5)
    assert not waiting.is_alive()


def test_cancel_wakes_threads_held_by_a_pause_with_no_ticket():
    limiter = Limiter(requests_per_second=1)
    limiter.pause(60)  # a 429's Retry-After
    tickets = []
    waiting = threading.Thread(target=lambda: tickets.append(limiter.acquire(10)), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()
    limiter.cancel()  # a 401 or Ctrl-C
    waiting.join(5)
    assert not waiting.is_alive() and tickets == [None]
    assert limiter.acquire(10) is None  # nothing starts after a cancel
