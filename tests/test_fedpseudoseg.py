"""FedPseudoSeg (issue 10's pseudo-segmentation ablation): the intensity clusters and the in-plane
smoothing against hand-written cases, and a federated run that learns to segment the clusters
and averages the whole network."""

import math

import torch
from monai.networks.layers import GaussianFilter

from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.fedpseudoseg import PseudoSegTrainer
from fedcontrast.methods.pseudo_labels import intensity_clusters, smooth_in_plane
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.presets import network_preset

CONFIG = {"bundle": {**network_preset("tiny"), "roi_size": [32, 32]}, "batch_size": 2, "seed": 5}


def test_intensity_clusters_number_classes_dark_to_bright():
    values = torch.tensor([9.0, 0.1, 5.0, 0.0, 10.0, 5.2, 0.2, 4.9, 9.5])
    # three well separated groups: ~0, ~5, ~10; the quantile start puts two centres in one group
    labels = intensity_clusters(values.view(1, 1, 3, 3), clusters=3, iterations=5)
    assert labels.shape == (1, 1, 3, 3) and labels.dtype == torch.int64
    assert labels.flatten().tolist() == [2, 0, 1, 0, 2, 1, 0, 1, 2]
    inverted = intensity_clusters(-values.view(1, 1, 3, 3), clusters=3, iterations=5)
    assert torch.equal(inverted, 2 - labels)  # per sample, from its own intensities
    both = intensity_clusters(torch.stack([values, 100 * values]).view(2, 1, 9), 3, 5)
    assert torch.equal(both[0], both[1])


def test_smooth_in_plane_smooths_each_slice_alone():
    slab = torch.zeros(1, 1, 9, 9, 2)
    slab[0, 0, 4, 4, 1] = 1.0  # an impulse in the second slice only
    smoothed = smooth_in_plane(slab, 1.0)
    assert torch.equal(smoothed[..., 0], slab[..., 0])  # nothing leaks across slices
    assert torch.allclose(smoothed[..., 1], GaussianFilter(2, 1.0)(slab[..., 1]))
    assert smoothed[0, 0, 4, 4, 1] < 1.0 and torch.isclose(smoothed.sum(), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(smooth_in_plane(slab, 0.0), slab)


def test_fedpseudoseg_learns_the_clusters_and_averages_the_whole_network(phantom_images):
    datalists = phantom_images(1)
    spec = get_method("fedpseudoseg")
    assert spec.federated and spec.pretraining and not spec.label_outputs
    config = {**CONFIG, "local_steps": 10, "clusters": 3}
    result = run_in_process("fedpseudoseg", config, datalists, rounds=3)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in result.history)
    for site in datalists:
        first, *_, last = (r["metrics"] for r in result.history if r["site"] == site)
        assert last["loss"] < first["loss"] and last["accuracy"] > max(first["accuracy"], 1 / 3)
    weights = message_to_state_dict(result.global_message)
    assert {k.split(".")[0] for k in weights} == {"encoder", "up_layers"}  # the whole network travels
    assert weights["up_layers.1.head.weight"].shape[0] == 3  # one output channel per cluster
    encoders = [result.encoders[s]["conv_init.weight"] for s in datalists]
    assert torch.allclose(weights["encoder.conv_init.weight"], sum(encoders) / len(encoders), atol=1e-6)
    model = PseudoSegTrainer.build_model(PseudoSegTrainer.DEFAULTS | config)
    assert model(torch.randn(2, 1, 32, 32, 2)).shape == (2, 3, 32, 32, 2)
