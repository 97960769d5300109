"""Building blocks of the methods: k-center greedy, nearest neighbours, routing, contrastive loss, maps."""

from __future__ import annotations

import pytest
import torch

from components.methods.contrastive import sample_patches, structure_contrastive_loss
from components.methods.coreset import coreset, k_center_greedy
from components.methods.knn import NearestNeighbours
from components.methods.routing import KeyRouter
from components.methods.scoring import anomaly_maps, gaussian_blur
from components.segment.grid import downsample_label_map
from tests.methods_support import ToyBackbone, label_maps_of, product_images


def test_k_center_greedy_has_the_farthest_point_property() -> None:
    points = torch.randn(300, 5)
    picked = k_center_greedy(points, 25)
    assert len(set(picked.tolist())) == 25
    assert picked[0] == 0
    for i in range(1, 25):
        nearest = torch.cdist(points, points[picked[:i]]).min(dim=1).values
        assert int(picked[i]) == int(nearest.argmax()), f"pick {i} is not the farthest remaining point"


def test_k_center_greedy_covers_clusters_and_clamps_k() -> None:
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    points = torch.cat([c + 0.1 * torch.randn(40, 2) for c in centres])
    chosen = points[k_center_greedy(points, 4)]
    assert torch.cdist(centres, chosen).min(dim=1).values.max() < 1.0  # one pick per cluster
    assert sorted(k_center_greedy(points[:7], 100).tolist()) == list(range(7))
    projected = k_center_greedy(torch.randn(200, 64), 10, projection_dim=8)
    assert len(set(projected.tolist())) == 10
    assert coreset(points, 6).shape == (6, 2)


def test_nearest_neighbours_match_brute_force() -> None:
    memory, queries = torch.randn(120, 16), torch.randn(40, 16)
    nn = NearestNeighbours(memory)
    dists, index = nn.search(queries, 3)
    brute = torch.cdist(queries, memory).topk(3, largest=False)
    assert torch.equal(index, brute.indices)
    assert torch.allclose(dists, brute.values, atol=1e-4)
    assert torch.allclose(nn.nearest_distance(queries), brute.values[:, 0], atol=1e-4)
    with pytest.raises(ValueError):
        nn.search(torch.randn(3, 15))


def test_routing_picks_the_task_whose_keys_are_nearest() -> None:
    centres = torch.randn(6, 12) * 10
    keys = [c + torch.randn(5 + t, 12) for t, c in enumerate(centres)]  # uneven key sizes
    truth = torch.randint(0, 6, (30,))
    key_feats = centres[truth][:, None, :] + torch.randn(30, 9, 12)
    assert torch.equal(KeyRouter(keys).route(key_feats), truth)  # what UCAD.route and LeMO run


def test_router_distances_equal_per_task_loop() -> None:
    keys = [torch.randn(7, 4), torch.randn(3, 4), torch.randn(11, 4)]
    key_feats = torch.randn(5, 6, 4)
    expected = torch.stack([torch.cdist(key_feats, k).min(dim=2).values.sum(dim=1) for k in keys], dim=1)
    assert torch.allclose(KeyRouter(keys).task_distances(key_feats), expected, atol=1e-4)
    with pytest.raises(ValueError):
        KeyRouter([])


def test_sample_patches_prefers_labelled_patches() -> None:
    labels = torch.tensor([[0, 1, 0, 2, 0, 3], [0, 0, 0, 0, 0, 5]])
    index, valid = sample_patches(labels, 4, torch.Generator().manual_seed(0))
    assert valid.sum(dim=1).tolist() == [3, 1]
    assert (labels.gather(1, index)[valid] != 0).all()


def test_contrastive_loss_prefers_segment_consistent_features() -> None:
    labels = torch.tensor([[1, 1, 1, 2, 2, 2, 3, 3]])
    directions = torch.eye(8)[:3] * 5
    clustered = directions[labels[0] - 1][None]  # same segment -> same direction
    shuffled = clustered[:, torch.tensor([0, 3, 6, 1, 4, 7, 2, 5])]
    low = structure_contrastive_loss(clustered, labels, 0.1, 8)
    high = structure_contrastive_loss(shuffled, labels, 0.1, 8)
    assert low < high
    no_pairs = structure_contrastive_loss(torch.randn(1, 4, 3, requires_grad=True), torch.tensor([[1, 2, 3, 0]]), 0.1, 4)
    assert float(no_pairs.detach()) == 0.0
    no_pairs.backward()  # stays differentiable, no NaN


def test_contrastive_loss_decreases_on_a_fixed_batch_when_training_a_prompt() -> None:
    backbone = ToyBackbone()
    images = product_images("red", 4, seed=3)
    labels = label_maps_of(images)
    grid_labels = downsample_label_map(labels, backbone.grid_size(images.shape[-1])).reshape(4, -1)
    prompt = backbone.new_prompt()
    optimizer = torch.optim.Adam(prompt.parameters(), lr=0.05)
    losses = []
    for _ in range(25):
        loss = structure_contrastive_loss(backbone.features(images, prompt), grid_labels, 0.1, 64, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is not None for p in prompt.parameters())
    assert all(p.grad is None for p in backbone.parameters())


def test_anomaly_maps_upsample_and_smooth() -> None:
    flat = torch.full((2, 16), 3.0)
    maps = anomaly_maps(flat, (4, 4), (32, 32), sigma=4.0)
    assert maps.shape == (2, 32, 32)
    assert torch.allclose(maps, torch.full_like(maps, 3.0), atol=1e-5)  # smoothing keeps constants
    spike = torch.zeros(1, 33, 33)
    spike[0, 16, 16] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-4 and float(blurred.max()) < 0.1
    assert int(blurred.flatten().argmax()) == 16 * 33 + 16


def test_patch_scores_average_the_requested_neighbours() -> None:
    from components.methods.scoring import score_patches

    memory = torch.randn(50, 6)
    feats = torch.randn(2, 5, 6)
    nearest, image, index = score_patches(feats, NearestNeighbours(memory), memory, reweight=False)
    three = score_patches(feats, NearestNeighbours(memory), memory, reweight=False, num_neighbors=3)[0]
    brute = torch.cdist(feats.reshape(10, 6), memory).topk(3, largest=False).values
    assert torch.allclose(nearest.flatten(), brute[:, 0], atol=1e-4)
    assert torch.allclose(three.flatten(), brute.mean(dim=1), atol=1e-4)
    assert torch.equal(image, nearest.max(dim=1).values) and index.shape == (2, 5)
