"""Attention backends, efficient stochastic depth, DINO head."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from dinov2.layers import AttentionDispatcher, Block, DINOHead
from dinov2.layers.attention import FlexAttention, math_attention, sdpa_attention
from dinov2.layers.stochastic_depth import residual

SEQS = [(3, 17), (5, 5), (2, 9)]


def _qkv(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(b * n for b, n in SEQS)
    return torch.randn(total, 3, 4, 16, generator=g).to(device=device, dtype=dtype).requires_grad_(True)


def _check_against_math(fn, device="cpu", dtype=torch.float32, backward=True, tol=1e-5):
    qkv = _qkv(device, dtype).requires_grad_(backward)
    ref_in = qkv.detach().double().requires_grad_(True)
    out = fn(qkv, SEQS)
    ref = math_attention(ref_in, SEQS)
    assert out.shape == ref.shape == (qkv.shape[0], 64)
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, err
    if backward:
        w = torch.randn_like(ref)
        (out.double() * w).sum().backward()
        (ref * w).sum().backward()
        assert (qkv.grad.double() - ref_in.grad).abs().max().item() <= tol


def test_math_attention_is_per_sample():
    qkv = _qkv()
    out = math_attention(qkv, SEQS)
    # sample 1 of group 0 alone gives the same rows: no attention across samples or groups
    rows = slice(17, 34)
    alone = math_attention(qkv[rows], [(1, 17)])
    assert torch.allclose(out[rows], alone, atol=1e-6)


def test_sdpa_matches_math():
    _check_against_math(sdpa_attention)


def test_flex_forward_matches_math_on_cpu():
    # forward only: FlexAttention has no backward on CPU (the GPU test checks gradients)
    _check_against_math(FlexAttention(compile=False), backward=False)


def test_flex_without_backward_on_cpu_keeps_sdpa_where_gradients_are_needed(caplog):
    # On CPU FlexAttention has no backward: the probe finds that out (forward and backward per dtype) and
    # the dispatcher uses flex only for forward passes without gradients, sdpa otherwise, with one warning
    from dinov2.layers.attention import SDPA

    dispatcher = AttentionDispatcher("flex", compile_flex=False)
    with caplog.at_level(logging.WARNING):
        name, flex = dispatcher.resolve(torch.device("cpu"))
    resolved = dispatcher._resolved["cpu"]
    if resolved.with_grad:
        pytest.skip("this torch supports FlexAttention backward on CPU")
    assert name == "flex" and resolved.pick(torch.float32, needs_grad=False) is flex
    assert resolved.pick(torch.float32, needs_grad=True) is SDPA
    assert len(caplog.records) == 1 and "where gradients are needed" in caplog.text


def test_varlen_falls_back_on_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        name, _ = AttentionDispatcher("varlen").resolve(torch.device("cpu"))
    assert name == "sdpa" and "varlen" in caplog.text


def test_xformers_selected_only_after_probe():
    dispatcher = AttentionDispatcher("xformers")
    name, fn = dispatcher.resolve(torch.device("cpu"))
    if name != "xformers":
        pytest.skip("xFormers is not usable on this device (import or probe call failed): fell back to sdpa")
    _check_against_math(fn, tol=1e-4)


def test_dispatcher_memo_is_bounded_per_device_type():
    dispatcher = AttentionDispatcher("auto")
    for _ in range(3):
        dispatcher.resolve(torch.device("cpu"))
    assert list(dispatcher._resolved) == ["cpu"]
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionDispatcher("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen", "xformers"])
def test_gpu_backends_against_sdpa(backend):
    name, fn = AttentionDispatcher(backend).resolve(torch.device("cuda"))
    if name != backend:
        pytest.skip(f"{backend} not usable on this GPU (fell back to {name})")
    qkv = _qkv("cuda", torch.bfloat16)
    ref_in = qkv.detach().float().requires_grad_(True)
    out = fn(qkv, SEQS)
    ref = sdpa_attention(ref_in, SEQS)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    w = torch.randn_like(ref)
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    assert ((qkv.grad.float() - ref_in.grad).norm() / ref_in.grad.norm()).item() < 2e-2


# ------------------------------------------------------------------------------ stochastic depth
def _block(p=0.0, mode="efficient"):
    torch.manual_seed(0)
    return Block(32, 4, layerscale_init=0.7, drop_path=p, drop_path_mode=mode)


def _packed_input(seqs, dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(b * n for b, n in seqs), dim, generator=g)


def test_drop_rate_zero_is_exactly_the_plain_block():
    block = _block(0.0).train()
    seqs = [(4, 9), (6, 4)]
    x = _packed_input(seqs)
    # the plain pre-norm block written out by hand
    h = x + block.ls1.gamma * block.attn.proj(math_attention(block.attn.packed_qkv(block.norm1(x)), seqs))
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    ref = h + block.ls2.gamma * fc2(nn.functional.gelu(fc1(block.norm2(h))))
    assert torch.allclose(block(x, seqs), ref, atol=1e-6)


@pytest.mark.parametrize("mode", ["efficient", "classic"])
def test_stochastic_depth_expectation_matches_undropped(mode):
    seqs = [(8, 3), (5, 2)]
    x = _packed_input(seqs, dim=6)
    weight = torch.randn(6, 6)

    def branch(t, s):  # any per-token function
        return torch.tanh(t @ weight)

    torch.manual_seed(0)
    draws = 4000
    mean = sum(residual(x, seqs, branch, 0.4, mode, training=True) for _ in range(draws)) / draws
    expected = x + branch(x, seqs)
    rel = ((mean - expected).norm() / (expected - x).norm()).item()
    assert rel < 0.05, rel
    single = residual(x, seqs, branch, 0.4, mode, training=True)
    assert not torch.allclose(single, expected)  # a single draw really drops something


def test_efficient_stochastic_depth_touches_only_a_subset():
    seqs = [(10, 3)]
    x = _packed_input(seqs, dim=4)
    seen = []

    def branch(t, s):
        seen.append(s)
        return torch.ones_like(t)

    out = residual(x, seqs, branch, 0.4, "efficient", training=True)
    assert seen == [[(6, 3)]]  # floor(10 * 0.6) samples
    changed = (out - x).abs().sum(-1).reshape(10, 3).sum(-1) > 0
    assert changed.sum() == 6
    assert torch.allclose((out - x)[(out - x).abs().sum(-1) > 0], torch.full((18, 4), 10 / 6))


def test_fvcore_flops_fall_with_drop_rate():
    from fvcore.nn import FlopCountAnalysis

    seqs = [(20, 17)]

    class Wrapped(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x, seqs)

    x = _packed_input(seqs)
    counts = {}
    for p in (0.0, 0.4):
        counter = FlopCountAnalysis(Wrapped(_block(p).train()), (x,))
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts[p] = counter.total()
    ratio = counts[0.4] / counts[0.0]
    assert abs(ratio - 0.6) < 0.05, ratio  # 12 of 20 samples per branch


# ------------------------------------------------------------------------------------- DINO head
def test_dino_head_structure_and_value():
    torch.manual_seed(0)
    head = DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert parametrize.is_parametrized(head.last_layer, "weight") and head.last_layer.bias is None
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.mul_(torch.linspace(0.5, 2, 10)[:, None])
    x = torch.randn(5, 16)
    z = head.mlp(x)
    z = z / z.norm(dim=-1, keepdim=True)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    ref = z @ (g * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head(x), ref, atol=1e-6)
