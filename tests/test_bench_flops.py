"""The FLOP counter behind the reversible step-time floor (bench/flops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.flops import FlopCounter


@pytest.mark.unit
def test_counts_matmuls_of_forward_and_backward():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    with FlopCounter() as counter:
        y = F.linear(x, w, b)  # addmm: 2*8*16*32
    assert counter.counts["matmul"] == 2 * 8 * 16 * 32
    with FlopCounter() as counter:
        y.sum().backward()  # dX and dW: two more matmuls of the same size
    assert counter.counts["matmul"] == 2 * (2 * 8 * 16 * 32)
    with FlopCounter() as counter:
        torch.bmm(torch.randn(3, 4, 5), torch.randn(3, 5, 6))
    assert counter.counts["matmul"] == 2 * 3 * 4 * 5 * 6 and counter.calls["matmul"] == 1


@pytest.mark.unit
def test_counts_attention_by_its_shapes():
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    with FlopCounter() as counter:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    forward = 4 * 2 * 3 * 10 * 10 * 8
    # CPU runs the flash kernel; a math fallback would show up as bmm instead.
    assert counter.total == forward
    with FlopCounter() as counter:
        out.sum().backward()
    assert counter.total == 5 * forward // 2


@pytest.mark.unit
def test_other_ops_count_the_bytes_they_write():
    x = torch.randn(100, dtype=torch.float32)
    with FlopCounter() as counter:
        y = x.to(torch.float64) * 2  # cast: 800 bytes, mul: 800 bytes
        y.view(10, 10).t()  # views write nothing
    assert counter.counts["other_bytes"] == 1600 and counter.calls["other"] == 2
    assert counter.total == 0
