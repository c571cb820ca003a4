"""The one InfoNCE-with-a-positive-set and the losses built on it, against hand-computed values.

Every expected value below is worked out by hand from SPEC §0,
``l(q, P, N) = -(1/|P|) sum_k log(e^{q·k/τ} / (e^{q·k/τ} + sum_n e^{q·n/τ}))``,
using ``-log(e^a / (e^a + S)) = log(1 + S e^{-a})``.
"""

import math

import pytest
import torch

from fedcontrast.methods.losses import fcl_loss, global_contrastive_loss, info_nce

E = math.e


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_info_nce_two_positives_one_negative():
    # q = (1, 0); P = {(1, 0), (0, 1)}; N = {(-1, 0)}; τ = 1.
    # dots: a1 = 1, a2 = 0, b = -1.
    # term 1 = log(1 + e^{-1} e^{-1}) = log(1 + e^-2) = log(1.1353352832) = 0.1269280110
    # term 2 = log(1 + e^{-1} e^{0})  = log(1 + e^-1) = log(1.3678794412) = 0.3132616875
    # l = (0.1269280110 + 0.3132616875) / 2 = 0.2200948493
    loss = info_nce(t([1, 0]), t([1, 0], [0, 1]), t([-1, 0]), temperature=1.0)
    assert loss.item() == pytest.approx(0.2200948493, abs=1e-9)


def test_info_nce_temperature_scales_the_logits():
    # q = (1, 0); k = (0.6, 0.8); n = (0.8, 0.6); τ = 0.5: a = 0.6 / 0.5 = 1.2, b = 0.8 / 0.5 = 1.6.
    # l = log(1 + e^{1.6 - 1.2}) = log(1 + e^0.4) = log(2.4918246976) = 0.9130152524
    loss = info_nce(t([1, 0]), t([0.6, 0.8]), t([0.8, 0.6]), temperature=0.5)
    assert loss.item() == pytest.approx(0.9130152524, abs=1e-9)


def test_info_nce_default_temperature_is_0_1():
    # q = k = (1, 0), n = (0, 1), τ = 0.1: a = 10, b = 0: l = log(1 + e^-10) = 4.5398899e-5.
    loss = info_nce(t([1, 0]), t([1, 0]), t([0, 1]))
    assert loss.item() == pytest.approx(4.5398899217e-05, rel=1e-8)


def test_info_nce_masks_select_per_query_sets_and_skip_queries_without_positives():
    # Candidates: positives k1 = (1, 0), k2 = (0, 1); negatives n1 = (-1, 0), n2 = (0, -1). τ = 1.
    # query A = (1, 0): P = {k1} (a = 1), N = {n1} (b = -1): l = log(1 + e^{-1-1}) = 0.1269280110
    # query B = (0, 1): P = {k2} (a = 1), N = {}:           l = log(1 + 0) = 0
    # query C = (1, 0): P = {} -> left out of the mean.
    # mean over A and B = 0.1269280110 / 2 = 0.0634640055
    query = t([1, 0], [0, 1], [1, 0])
    positive_mask = torch.tensor([[True, False], [False, True], [False, False]])
    negative_mask = torch.tensor([[True, False], [False, False], [True, True]])
    loss = info_nce(query, t([1, 0], [0, 1]), t([-1, 0], [0, -1]), 1.0, positive_mask, negative_mask)
    assert loss.item() == pytest.approx(0.0634640055, abs=1e-9)


def test_info_nce_without_any_positive_is_a_differentiable_zero():
    query = t([1, 0]).requires_grad_()
    loss = info_nce(query, t([0, 1]), t([-1, 0]), 1.0, positive_mask=torch.tensor([[False]]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(query.grad, torch.zeros_like(query))


def test_info_nce_gradients_are_finite_with_fully_masked_negatives():
    query = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1).requires_grad_()
    keys = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    loss = info_nce(query, keys, keys, 0.1, negative_mask=torch.zeros(4, 5, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(query.grad).all()


def test_fcl_loss_terms_by_hand():
    # q = (1, 0), partition 0, τ = 1.
    # local:  k = (1, 0) p0 (the other view), l1 = (0, 1) p1;  remote: r0 = (0, 1) p0, r1 = (-1, 0) p1.
    # Q' = features of partitions != 0 = {l1 (dot 0), r1 (dot -1)}: S = e^0 + e^-1 = 1.3678794412.
    # local term  l(q, {k}, Q')  = log(1 + S e^-1) = log(1.5032147244) = 0.4076059644
    # remote term l(q, {r0}, Q') = log(1 + S e^0)  = log(2.3678794412) = 0.8619948041
    local_term, remote_term = fcl_loss(
        t([1, 0]),
        torch.tensor([0]),
        t([1, 0], [0, 1]),
        torch.tensor([0, 1]),
        t([0, 1], [-1, 0]),
        torch.tensor([0, 1]),
        temperature=1.0,
    )
    assert local_term.item() == pytest.approx(0.4076059644, abs=1e-9)
    assert remote_term.item() == pytest.approx(0.8619948041, abs=1e-9)


def test_fcl_remote_positives_are_only_the_query_partition():
    # Moving the remote feature of another partition onto the query changes only the negatives
    # (both terms grow); moving the same-partition remote feature changes only the remote term.
    q, qp = t([1, 0]), torch.tensor([0])
    local, lp = t([1, 0]), torch.tensor([0])
    rp = torch.tensor([0, 1])
    base = fcl_loss(q, qp, local, lp, t([0, 1], [0, -1]), rp, 1.0)
    same_partition_moved = fcl_loss(q, qp, local, lp, t([1, 0], [0, -1]), rp, 1.0)
    assert same_partition_moved[0].item() == pytest.approx(base[0].item())
    assert same_partition_moved[1].item() < base[1].item()
    # With no remote feature of partition 0 there is no remote positive: the term is 0.
    only_other = fcl_loss(q, qp, local, lp, t([1, 0]), torch.tensor([1]), 1.0)
    assert only_other[1].item() == 0.0


def test_fcl_remote_term_is_zero_without_remote_features():
    local_term, remote_term = fcl_loss(
        t([1, 0]),
        torch.tensor([0]),
        t([1, 0]),
        torch.tensor([0]),
        torch.empty(0, 2, dtype=torch.float64),
        torch.empty(0, dtype=torch.long),
        1.0,
    )
    assert remote_term.item() == 0.0
    assert local_term.item() == 0.0  # no negatives either: log(1 + 0)


# Three samples of three volumes, both views identical, τ = 1:
#   s0 = (1, 0) partition 0, s1 = (0, 1) partition 0, s2 = (-1, 0) partition 1.
# By symmetry view 1 and view 2 queries give the same values; the loss is the mean over s0, s1, s2.
GLOBAL_EMBEDDINGS = t([1, 0], [0, 1], [-1, 0], [1, 0], [0, 1], [-1, 0])
GLOBAL_PARTITIONS = torch.tensor([0, 0, 1])
GLOBAL_VOLUMES = torch.tensor([0, 1, 2])
# G^R: the other view (dot 1) against all 4 other embeddings.
#   s0: negatives s1 x2 (dot 0), s2 x2 (dot -1): log(1 + (2 + 2/e) / e)
#   s1: negatives s0 x2, s2 x2 (all dot 0):        log(1 + 4 / e)
#   s2: negatives s0 x2 (dot -1), s1 x2 (dot 0):  log(1 + (2 + 2/e) / e)
G_R = (2 * math.log(1 + (2 + 2 / E) / E) + math.log(1 + 4 / E)) / 3
# G^D-: as G^R without same-partition negatives.
#   s0: negatives s2 x2 (dot -1): log(1 + (2/e) / e);  s1: negatives s2 x2 (dot 0): log(1 + 2 / e)
#   s2: negatives s0 x2, s1 x2: log(1 + (2 + 2/e) / e)
G_D_MINUS = (math.log(1 + 2 / E**2) + math.log(1 + 2 / E) + math.log(1 + (2 + 2 / E) / E)) / 3
# G^D: s0 and s1 also take both views of each other (dot 0) as positives; negatives as G^D-.
#   s0: (log(1 + 2/e^2) + 2 log(1 + 2/e)) / 3;  s1: (log(1 + 2/e) + 2 log(1 + 2)) / 3;  s2 as G^D-.
G_D = (
    (math.log(1 + 2 / E**2) + 2 * math.log(1 + 2 / E)) / 3
    + (math.log(1 + 2 / E) + 2 * math.log(3)) / 3
    + math.log(1 + (2 + 2 / E) / E)
) / 3


@pytest.mark.parametrize(("strategy", "expected"), [("G^R", G_R), ("G^D-", G_D_MINUS), ("G^D", G_D)])
def test_global_contrastive_strategies_by_hand(strategy, expected):
    loss = global_contrastive_loss(GLOBAL_EMBEDDINGS, GLOBAL_PARTITIONS, GLOBAL_VOLUMES, strategy, 1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_global_contrastive_rejects_unknown_strategy_and_bad_shapes():
    with pytest.raises(ValueError, match="G\\^D"):
        global_contrastive_loss(GLOBAL_EMBEDDINGS, GLOBAL_PARTITIONS, GLOBAL_VOLUMES, "GD")
    with pytest.raises(ValueError, match="2 views"):
        global_contrastive_loss(GLOBAL_EMBEDDINGS[:5], GLOBAL_PARTITIONS, GLOBAL_VOLUMES)
