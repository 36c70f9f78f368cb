"""Target layer groups (attribution/layer_groups.py, the SAT task's SAT_GROUPS) on the tiny DiT: exact
parameter names per group."""
from __future__ import annotations

import pytest
import torch

from conftest import make_module
from musicattr.attribution import layer_groups
from musicattr.attribution.layer_groups import target_pattern
from musicattr.models.sat_task import SAT_GROUPS as TARGET_GROUPS


def select_parameters(net, target):
    return layer_groups.select_parameters(net, target, TARGET_GROUPS)


DEPTH = 2
BLOCK = ["pre_norm.gamma", "self_attn.to_qkv.weight", "self_attn.to_out.weight", "cross_attend_norm.gamma",
         "cross_attn.to_q.weight", "cross_attn.to_kv.weight", "cross_attn.to_out.weight", "ff_norm.gamma",
         "ff.ff.0.proj.weight", "ff.ff.0.proj.bias", "ff.ff.2.weight", "ff.ff.2.bias"]


def _names(suffixes):
    return {f"model.transformer.layers.{i}.{s}" for i in range(DEPTH) for s in suffixes}


EXPECTED = {
    "all": _names(BLOCK),
    "self": _names(["self_attn.to_qkv.weight", "self_attn.to_out.weight"]),
    "cross": _names(["cross_attn.to_q.weight", "cross_attn.to_kv.weight", "cross_attn.to_out.weight"]),
    "to_kv": _names(["cross_attn.to_kv.weight"]),
}


@pytest.fixture(scope="module")
def net():
    return make_module().net


def test_tiny_model_layout_is_what_the_groups_assume(net):
    names = {n for n, _ in net.named_parameters()}
    assert EXPECTED["all"] <= names
    # outside the blocks: embeddings, projections and convs are never unlearned by a named group
    outside = names - EXPECTED["all"]
    assert "model.transformer.project_in.weight" in outside and "model.preprocess_conv.weight" in outside
    assert "model.to_timestep_embed.0.weight" in outside


@pytest.mark.parametrize("group", ["all", "self", "cross", "to_kv"])
def test_named_groups_select_exact_tensors(net, group):
    chosen = select_parameters(net, group)
    assert set(chosen) == EXPECTED[group]
    named = dict(net.named_parameters())
    for k, p in chosen.items():
        assert p is named[k]  # the live parameters, not copies


def test_groups_are_nested():
    assert EXPECTED["to_kv"] < EXPECTED["cross"] < EXPECTED["all"]
    assert EXPECTED["self"] < EXPECTED["all"] and not EXPECTED["self"] & EXPECTED["cross"]
    assert set(TARGET_GROUPS) == {"all", "self", "cross", "to_kv"}


def test_regex_target(net):
    chosen = select_parameters(net, r"layers\.1\.cross_attn\.to_q\.")
    assert set(chosen) == {"model.transformer.layers.1.cross_attn.to_q.weight"}
    assert target_pattern("self", TARGET_GROUPS) == TARGET_GROUPS["self"]
    assert target_pattern("foo.*", TARGET_GROUPS) == "foo.*"


def test_frozen_parameters_are_not_selected():
    net = make_module().net
    net.model.transformer.layers[0].self_attn.to_qkv.weight.requires_grad_(False)
    chosen = select_parameters(net, "self")
    assert set(chosen) == EXPECTED["self"] - {"model.transformer.layers.0.self_attn.to_qkv.weight"}


def test_empty_selection_raises_clear_error(net):
    with pytest.raises(ValueError, match="selects no parameter") as e:
        select_parameters(net, "no_such_layer")
    assert "all" in str(e.value) and "to_kv" in str(e.value)  # names the valid groups


def test_bad_regex_raises(net):
    import re

    with pytest.raises((re.error, ValueError)):
        select_parameters(net, "layers.(")


def test_bad_regex_error_names_the_target(net):
    with pytest.raises(ValueError, match=r"layers\.\(") as e:
        select_parameters(net, "layers.(")
    assert "to_kv" in str(e.value)
