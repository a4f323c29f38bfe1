"""A hard spending cap for one stage run (`budget_usd`): reserve a request's worst case, settle with what it cost.

Before a request is sent, its worst case (every prompt byte a token, plus `max_tokens` of reply) is reserved; when
the reply comes, the reservation is replaced by the cost of its `usage`. A refused request (429, 5xx, other 4xx)
costs nothing; one whose fate is unknown (timeout, dropped connection, unreadable 2xx body) keeps its worst case,
since the provider may have billed it. A request is sent only if the spend so far plus everything reserved plus its
own worst case stays within the cap; if it would fit once the requests in flight settle, it waits for them. The
first request that cannot fit exhausts the budget: it and every later one fail with reason `budget`, unsent.
"""

import threading

from nlistral.llm.base import RequestFailed

# Mistral's chat template adds a few control tokens per message ([INST], [/INST], [SYSTEM_PROMPT]...) and a BOS.
TEMPLATE_TOKENS_PER_MESSAGE = 8


def worst_prompt_tokens(messages: list[dict]) -> int:
    """An upper bound on the prompt tokens of `messages` for any byte-level tokenizer (a token covers >= 1 byte)."""
    return 1 + sum(len(m["content"].encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)


class Budget:
    def __init__(self, cap_usd: float, price_in_per_mtok: float, price_out_per_mtok: float, price_factor: float):
        self.cap = float(cap_usd)
        self.price_in = price_in_per_mtok * price_factor / 1e6
        self.price_out = price_out_per_mtok * price_factor / 1e6
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False
        self.refused = 0  # requests not sent for the budget
        self._cancelled = False
        self._changed = threading.Condition()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.price_in + completion_tokens * self.price_out

    def worst(self, messages: list[dict], max_tokens: int) -> float:
        return self.cost(worst_prompt_tokens(messages), max_tokens)

    def reserve(self, usd: float, wait: bool = True) -> float | None:
        """Hold `usd` for a request about to be sent; RequestFailed('budget') if it could cross the cap.

        Waits while requests in flight hold what it needs (with `wait`; a batch round, whose holds settle only when
        its job ends, does not); returns None (send nothing) once cancelled.
        """
        with self._changed:
            while True:
                if self._cancelled:
                    return None
                committed = self.spent + (0.0 if wait else self.reserved)
                if self.exhausted or committed + usd > self.cap:
                    self.exhausted = True
                    self.refused += 1
                    raise RequestFailed(
                        "budget",
                        f"not sent: budget_usd={self.cap:g} reached (this run spent ${self.spent:.4f}; a request's "
                        f"worst case is ${usd:.4f})",
                    )
                if self.spent + self.reserved + usd <= self.cap:
                    self.reserved += usd
                    return usd
                self._changed.wait()  # a request in flight settles

    def settle(self, held: float, usd: float) -> None:
        """Replace a reservation of `held` by what the request cost."""
        with self._changed:
            self.reserved -= held
            self.spent += usd
            self._changed.notify_all()

    def cancel(self) -> None:
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()
