"""Retrieval over per-location mean adapters, against closed-form answers."""

from __future__ import annotations

import pytest
import torch

from model_store.retrieval import WEIGHTINGS, knn_blend, nearest, neighbours

MEANS = torch.tensor([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0], [-6.0, 8.0]])  # (L=4, P=2)
DISTANCES = torch.tensor([3.0, 1.0, 4.0, 2.0])  # nearest first: 1, 3, 0, 2


def test_nearest_is_the_row_of_the_smallest_distance():
    assert torch.equal(nearest(MEANS, DISTANCES), MEANS[1])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_one_neighbour_is_nearest(weighting):
    assert torch.equal(knn_blend(MEANS, DISTANCES, 1, weighting), nearest(MEANS, DISTANCES))


def test_uniform_two_is_the_mean_of_the_two_nearest():
    assert torch.allclose(knn_blend(MEANS, DISTANCES, 2, "uniform"), (MEANS[1] + MEANS[3]) / 2)


def test_inverse_distance_weights():
    # weights 1/1, 1/2, 1/3 for locations 1, 3, 0, normalised by their sum 11/6
    expected = (6 / 11) * (MEANS[1] + MEANS[3] / 2 + MEANS[0] / 3)
    assert torch.allclose(knn_blend(MEANS, DISTANCES, 3, "inverse_distance"), expected)


def test_k_beyond_the_locations_uses_all_and_zero_distance_dominates():
    assert torch.allclose(knn_blend(MEANS, DISTANCES, 10, "uniform"), MEANS.mean(0))
    at_zero = knn_blend(MEANS, torch.tensor([0.0, 1.0, 4.0, 2.0]), 3, "inverse_distance")
    assert torch.allclose(at_zero, MEANS[0], atol=1e-4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown knn weighting 'median'"):
        knn_blend(MEANS, DISTANCES, 2, "median")
    with pytest.raises(ValueError, match="k must be at least 1"):
        knn_blend(MEANS, DISTANCES, 0, "uniform")


def test_neighbours_are_the_k_closest_per_row_closest_first():
    distances = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.25, 9.0, 8.0, 7.0]])
    values, index = neighbours(distances, 2)
    assert index.tolist() == [[3, 1], [0, 3]]
    assert values.tolist() == [[0.5, 1.0], [0.25, 7.0]]
    with pytest.raises(ValueError, match="k must be in 1..4"):
        neighbours(distances, 5)
