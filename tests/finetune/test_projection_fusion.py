"""MLA's head gradient projection and its test-time fusion, checked numerically."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastav.finetune.balance import entropy, entropy_weights, fuse
from fastav.finetune.projection import HeadProjector, alpha_at, project_gradient


def _orthogonal_to(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v - (v @ h) / (h @ h) * h


def test_projection_removes_the_gradient_component_along_seen_mean_features() -> None:
    g = torch.Generator().manual_seed(1)
    d, C, alpha = 24, 5, 0.01
    grad_CD = torch.randn(C, d, generator=g, dtype=torch.float64)
    h1, h2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    proj = HeadProjector(d, normalize=False)
    proj.P = proj.P.double()
    proj.update(h1, alpha)
    P = proj.P
    # along h1 only alpha / (alpha + |h1|^2) of the response is left; orthogonal directions are untouched
    kept = alpha / (alpha + h1 @ h1)
    assert torch.allclose(grad_CD @ P @ h1, kept * (grad_CD @ h1), rtol=1e-9)
    assert (grad_CD @ P @ h1).norm() < 1e-3 * (grad_CD @ h1).norm()
    v = _orthogonal_to(h1, torch.randn(d, generator=g, dtype=torch.float64))
    assert torch.allclose(grad_CD @ P @ v, grad_CD @ v, rtol=1e-9)
    # a second mean feature: both seen directions are now (almost) removed, the rest of the space is kept
    proj.update(h2, alpha)
    P = proj.P
    for h in (h1, h2):
        assert (grad_CD @ P @ h).norm() < 2e-3 * (grad_CD @ h).norm()
    basis = torch.linalg.qr(torch.stack([h1, h2], dim=1))[0]
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w = w - basis @ (basis.T @ w)
    assert torch.allclose(grad_CD @ P @ w, grad_CD @ w, rtol=1e-8)
    assert torch.allclose(P, P.T)


def test_normalised_projector_only_rescales_and_alpha_schedule() -> None:
    d = 8
    h = torch.arange(1.0, d + 1)
    plain, normed = HeadProjector(d, normalize=False), HeadProjector(d)
    plain.update(h, 0.1)
    normed.update(h, 0.1)
    assert torch.allclose(normed.P * torch.linalg.matrix_norm(plain.P), plain.P, atol=1e-6)
    assert torch.linalg.matrix_norm(normed.P).item() == pytest.approx(1.0, abs=1e-6)
    assert alpha_at(0.1, 0, 10) == pytest.approx(0.1) and alpha_at(0.1, 5, 10) == pytest.approx(0.1**1.5)


def test_project_gradient_is_identity_forward_and_projects_the_weight_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 6, generator=g, requires_grad=True)
    b = torch.randn(3, generator=g, requires_grad=True)
    z = torch.randn(4, 6, generator=g)
    y = torch.tensor([0, 2, 1, 2])
    proj = HeadProjector(6)
    proj.update(z.mean(dim=0), 0.1)
    out = F.linear(z, project_gradient(W, proj.P), b)
    assert torch.equal(out, F.linear(z, W, b))
    F.cross_entropy(out, y).backward()
    W_plain, b_plain = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(z, W_plain, b_plain), y).backward()
    assert torch.allclose(W.grad, W_plain.grad @ proj.P, atol=1e-6)
    assert torch.equal(b.grad, b_plain.grad)  # the bias gradient is left alone


def test_per_sample_entropy_weights_sum_to_one_and_favour_the_confident_modality() -> None:
    o_a = torch.tensor([[8.0, 0.0, 0.0], [0.3, 0.2, 0.1], [1.0, 1.0, 1.0]])  # confident, unsure, uniform
    o_v = torch.tensor([[0.3, 0.2, 0.1], [0.0, 9.0, 0.0], [1.0, 1.0, 1.0]])  # unsure, confident, uniform
    w = entropy_weights(o_a, o_v)
    assert w.shape == (3, 2)
    assert torch.allclose(w.sum(dim=1), torch.ones(3))
    assert w[0, 0] > 0.6 and w[1, 1] > 0.6 and torch.allclose(w[2], torch.tensor([0.5, 0.5]))
    expected = torch.softmax(-torch.stack([entropy(o_a), entropy(o_v)], dim=1), dim=1)
    assert torch.allclose(w, expected)
    # per sample, not per batch: a row's weights do not depend on the other rows
    assert torch.allclose(entropy_weights(o_a[:1], o_v[:1]), w[:1])
    fused = fuse(w, o_a, o_v)
    assert torch.allclose(fused[1], w[1, 0] * o_a[1] + w[1, 1] * o_v[1])
    assert fused.argmax(dim=1)[:2].tolist() == [0, 1]  # each row follows its confident modality
