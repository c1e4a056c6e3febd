"""Importance building blocks: the orthogonal regularizer and the triplet scores."""

from __future__ import annotations

import torch

from adalora_pl import orthogonal_regularizer, triplet_scores


def test_orthogonal_regularizer_formula():
    A = torch.randn(3, 5)
    B = torch.randn(4, 3)
    expected = (torch.linalg.matrix_norm(A @ A.T - torch.eye(3)) + torch.linalg.matrix_norm(B.T @ B - torch.eye(3))) / 2
    torch.testing.assert_close(orthogonal_regularizer([(A, B)]), expected)


def test_triplet_scores_shapes():
    s = triplet_scores(torch.ones(3, 1), torch.full((3, 5), 2.0), torch.full((4, 3), 4.0))
    assert s.tolist() == [7.0, 7.0, 7.0]
