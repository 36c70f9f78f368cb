"""Target layer groups: which DiT parameters unlearning changes (paper Table 1, "Target").

Names are relative to SAT's DiTWrapper, e.g. ``model.transformer.layers.3.cross_attn.to_kv.weight``.
"""
from __future__ import annotations

import re

import torch

TARGET_GROUPS = {
    "all": r"transformer\.layers\.\d+\.",                      # every weight of every transformer block
    "self": r"transformer\.layers\.\d+\.self_attn\.",          # self-attention (to_qkv, to_out)
    "cross": r"transformer\.layers\.\d+\.cross_attn\.",        # cross-attention (to_q, to_kv, to_out)
    "to_kv": r"transformer\.layers\.\d+\.cross_attn\.to_kv\.",  # cross-attention keys/values only
}


def target_pattern(target: str) -> str:
    """Regex of a named group, or ``target`` itself taken as a regex over parameter names."""
    return TARGET_GROUPS.get(target, target)


def select_parameters(net: torch.nn.Module, target: str) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters of ``net`` whose names match the target group (``re.search``)."""
    try:
        pat = re.compile(target_pattern(target))
    except re.error as e:
        raise ValueError(f"target {target!r} is neither a named group {sorted(TARGET_GROUPS)} "
                         f"nor a valid regular expression: {e}") from e
    chosen = {n: p for n, p in net.named_parameters() if p.requires_grad and pat.search(n)}
    if not chosen:
        raise ValueError(f"target {target!r} selects no parameter; named groups: {sorted(TARGET_GROUPS)} "
                         "or a regular expression over names such as 'model.transformer.layers.0.self_attn.to_qkv.weight'")
    return chosen
