"""Importance building blocks: the orthogonal regularizer and the triplet scores."""

from __future__ import annotations

import torch

from adalora_pl import orthogonal_regularizer, triplet_scores


def test_orthogonal_regularizer_formula():
    A = torch.randn(3, 5)
    B = torch.randn(4, 3)
    expected = (torch.linalg.matrix_norm(A @ A.T - torch.eye(3)) + torch.linalg.matrix_norm(B.T @ B - torch.eye(3))) / 2
    torch.testing.assert_close(orthogonal_regularizer([(A, B)]), expected)


def test_triplet_scores_follow_the_formula():
    """S_i = s(E_i) + mean_j s(A[i, j]) + mean_k s(B[k, i]) (docs/method.md §3) on random element scores, with
    in_features != out_features != r so that a mean over the wrong axis, or anything but a mean, shows."""
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 3, 5, 4
    score_E = torch.rand(r, 1, generator=g)
    score_A = torch.rand(r, d_in, generator=g)
    score_B = torch.rand(d_out, r, generator=g)
    got = triplet_scores(score_E, score_A, score_B)
    assert got.shape == (r,)
    # The definition element by element, in float64. float32 differs by its roundings only: d_in - 1 and d_out - 1
    # additions in the sums, two divisions, two additions, each at most eps relative on positive terms.
    expected = torch.tensor([
        score_E[i, 0].double() + sum(score_A[i, j].double() for j in range(d_in)) / d_in
        + sum(score_B[k, i].double() for k in range(d_out)) / d_out
        for i in range(r)
    ])
    torch.testing.assert_close(got.double(), expected, rtol=(d_in + d_out + 2) * torch.finfo(torch.float32).eps,
                               atol=0)
    assert len(set(got.tolist())) == r  # distinct scores: the inputs do tell the triplets apart
