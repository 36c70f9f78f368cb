"""Target layer groups: which parameters unlearning changes (paper Table 1, "Target").

A task names its groups (``AttributionTask.parameter_groups``: name -> regular expression over the
parameter names of ``task.net``); a target is one of those names or a regular expression itself.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch


def target_pattern(target: str, groups: Mapping[str, str]) -> str:
    """Regex of a named group, or ``target`` itself taken as a regex over parameter names."""
    return groups.get(target, target)


def select_parameters(net: torch.nn.Module, target: str, groups: Mapping[str, str]) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters of ``net`` whose names match the target group (``re.search``)."""
    try:
        pat = re.compile(target_pattern(target, groups))
    except re.error as e:
        raise ValueError(f"target {target!r} is neither a named group {sorted(groups)} "
                         f"nor a valid regular expression: {e}") from e
    chosen = {n: p for n, p in net.named_parameters() if p.requires_grad and pat.search(n)}
    if not chosen:
        example = next((n for n, _ in net.named_parameters()), "")
        raise ValueError(f"target {target!r} selects no parameter; named groups: {sorted(groups)} "
                         f"or a regular expression over names such as {example!r}")
    return chosen
