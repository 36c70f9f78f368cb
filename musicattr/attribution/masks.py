"""Silence masking strategies (paper Section 2.3).

``mask_unlearn`` (M_U): the query loss used for unlearning averages over non-padded frames only.
``mask_loss`` (M_L): the loss used for scoring averages over non-padded frames only.
"mixed" (the paper's choice): M_U on, M_L off, so scoring stays consistent with training.
"""
from __future__ import annotations

STRATEGIES = {"none": (False, False), "both": (True, True), "mixed": (True, False)}


def resolve_masks(strategy: str | None, mask_unlearn: bool | None = None, mask_loss: bool | None = None
                  ) -> tuple[bool, bool]:
    """(M_U, M_L) from a named strategy, overridden by explicit flags."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    mu, ml = STRATEGIES[strategy or "mixed"]
    return (mu if mask_unlearn is None else mask_unlearn), (ml if mask_loss is None else mask_loss)
