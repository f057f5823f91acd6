"""GPU cost model: predicted prefill and decode-step times for one emulated GPU.

Engines sleep for these times (stretched by time_dilation) to emulate compute, and the
scheduler uses the same numbers for its load estimates. All constants are real-hardware units;
callers apply time dilation. Pure arithmetic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModelParams:
    """Constants of one model profile on one GPU, in real (undilated) units."""

    prefill_base_ms: float
    prefill_us_per_token: float
    attention_ns_per_token_pair: float
    decode_base_ms: float
    decode_us_per_seq: float
    decode_ns_per_context_token: float


@dataclass(frozen=True, slots=True)
class CostModel:
    params: CostModelParams

    def attention_s(self, cached_tokens: int, new_tokens: int) -> float:
        """Attention time of `new_tokens` queries over `cached_tokens + new_tokens` keys."""
        if cached_tokens < 0 or new_tokens < 0:
            raise ValueError("token counts must be >= 0")
        p = self.params
        pairs = new_tokens * (cached_tokens + new_tokens / 2.0)
        return pairs * p.attention_ns_per_token_pair * 1e-9

    def prefill_s(self, cached_tokens: int, new_tokens: int) -> float:
        """Real seconds to prefill `new_tokens` on top of `cached_tokens` already in KV."""
        return self.prefill_step_s(new_tokens, self.attention_s(cached_tokens, new_tokens))

    def prefill_step_s(self, new_tokens: int, attention_s: float) -> float:
        """Real seconds of one prefill step computing `new_tokens` (of one or more requests)
        whose attention takes `attention_s`: one fixed step cost plus a cost per new token."""
        if new_tokens < 0 or attention_s < 0:
            raise ValueError("new_tokens and attention_s must be >= 0")
        p = self.params
        return p.prefill_base_ms * 1e-3 + new_tokens * p.prefill_us_per_token * 1e-6 + attention_s

    def decode_step_s(self, num_seqs: int, context_tokens: int) -> float:
        """Real seconds for one decode step of `num_seqs` sequences holding `context_tokens`."""
        if num_seqs < 0 or context_tokens < 0:
            raise ValueError("num_seqs and context_tokens must be >= 0")
        if num_seqs == 0:
            return 0.0
        p = self.params
        return (
            p.decode_base_ms * 1e-3
            + num_seqs * p.decode_us_per_seq * 1e-6
            + context_tokens * p.decode_ns_per_context_token * 1e-9
        )

    def prefill_tokens_per_s(self, cached_tokens: int, new_tokens: int) -> float:
        """Prompt tokens (cached + new) one GPU gets through per real second."""
        t = self.prefill_s(cached_tokens, new_tokens)
        return (cached_tokens + new_tokens) / t if t > 0 else float("inf")
