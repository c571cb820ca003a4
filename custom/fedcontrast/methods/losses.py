"""Contrastive losses, all written with one InfoNCE-with-a-positive-set (SPEC §0).

Every contrastive method of the project (FCL, local CL with G^R / G^D- / G^D,
FedSimCLR, FedMoCo) builds its loss from :func:`info_nce`; the methods differ only in
which candidates they mark as positives and negatives of each query, which
they express as boolean masks over shared candidate sets.

Embeddings are expected L2-normalised (unit vectors), so ``q·k`` is a cosine
similarity in [-1, 1] and ``temperature`` is dimensionless. Every loss runs in float32, also
when the forward pass ran under autocast (:func:`~fedcontrast.methods.device.float32_loss`).
"""

from __future__ import annotations

import torch

from fedcontrast.methods.device import float32_loss

#: The global contrastive strategies of Chaitanya et al. (SPEC §4).
GLOBAL_STRATEGIES: tuple[str, ...] = ("G^R", "G^D-", "G^D")


@float32_loss
def info_nce(
    query: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.1,
    positive_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with a positive set, averaged over queries (SPEC §0).

    For one query ``q`` with positive set ``P`` and negative set ``N``::

        l(q, P, N) = -(1/|P|) sum_{k in P} log( exp(q·k/τ) / (exp(q·k/τ) + sum_{n in N} exp(q·n/τ)) )

    Each positive is contrasted against the negatives only (other positives are
    not in its denominator).

    Args:
        query: ``(Q, C)`` query embeddings.
        positives: ``(P, C)`` candidate positives shared by all queries.
        negatives: ``(N, C)`` candidate negatives shared by all queries.
        temperature: τ > 0.
        positive_mask: ``(Q, P)`` bool, True where candidate ``k`` is a positive of query ``q``;
            None means every candidate is a positive of every query.
        negative_mask: ``(Q, N)`` bool, True where candidate ``n`` is a negative of query ``q``;
            None means every candidate is a negative of every query.

    Returns:
        Scalar: the mean of ``l`` over the queries with at least one positive; 0 (still
        differentiable) when no query has one. A query without negatives contributes 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_q = query.shape[0]
    if positive_mask is None:
        positive_mask = torch.ones(num_q, positives.shape[0], dtype=torch.bool, device=query.device)
    if negative_mask is None:
        negative_mask = torch.ones(num_q, negatives.shape[0], dtype=torch.bool, device=query.device)
    pos_logits = query @ positives.T / temperature  # (Q, P)
    neg_logits = (query @ negatives.T / temperature).masked_fill(~negative_mask, float("-inf"))  # (Q, N)
    # log of the negatives' sum, per query; -inf (a zero sum) when a query has no negative.
    neg_lse = torch.logsumexp(neg_logits, dim=1, keepdim=True)  # (Q, 1)
    # -log(e^a / (e^a + e^b)) = logaddexp(a, b) - a, for every (query, candidate positive).
    per_pair = torch.logaddexp(pos_logits, neg_lse) - pos_logits  # (Q, P)
    per_pair = per_pair.masked_fill(~positive_mask, 0.0)
    num_pos = positive_mask.sum(dim=1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return query.sum() * 0.0
    per_query = per_pair.sum(dim=1)[has_pos] / num_pos[has_pos]
    return per_query.mean()


@float32_loss
def fcl_loss(
    query: torch.Tensor,
    query_partitions: torch.Tensor,
    local: torch.Tensor,
    local_partitions: torch.Tensor,
    remote: torch.Tensor,
    remote_partitions: torch.Tensor,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two FCL terms ``l(q, P(q), Q')`` and ``l(q, Λ(q), Q')`` (SPEC §1).

    Args:
        query: ``(B, C)`` queries ``g(f(x))``.
        query_partitions: ``(B,)`` partition of each query.
        local: ``(L, C)`` local key features: this step's keys of the other view (so the
            other view of the query's own sample is among them) and the features sampled
            from the local bank.
        local_partitions: ``(L,)`` their partitions.
        remote: ``(R, C)`` features sampled from the remote bank (other sites); may be empty.
        remote_partitions: ``(R,)`` their partitions.
        temperature: τ.

    Returns:
        ``(local_term, remote_term)``; ``P(q)``: local features of the query's partition;
        ``Λ(q)``: remote features of the query's partition; ``Q'``: local and remote features
        of every other partition. The FCL loss is their sum. The remote term is 0 when no
        remote feature shares the query's partition (e.g. round 0).
    """
    negatives = torch.cat([local, remote])
    neg_partitions = torch.cat([local_partitions, remote_partitions])
    negative_mask = query_partitions[:, None] != neg_partitions[None, :]
    local_mask = query_partitions[:, None] == local_partitions[None, :]
    remote_mask = query_partitions[:, None] == remote_partitions[None, :]
    local_term = info_nce(query, local, negatives, temperature, local_mask, negative_mask)
    remote_term = info_nce(query, remote, negatives, temperature, remote_mask, negative_mask)
    return local_term, remote_term


@float32_loss
def global_contrastive_loss(
    embeddings: torch.Tensor,
    partitions: torch.Tensor,
    volumes: torch.Tensor,
    strategy: str = "G^D",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Global contrastive loss of Chaitanya et al. over a two-view batch (SPEC §4).

    Args:
        embeddings: ``(2B, C)``: view 1 of the B samples, then view 2 in the same order.
        partitions: ``(B,)`` partition of each sample.
        volumes: ``(B,)`` volume of each sample (unique within the batch, e.g. site-local ids).
        strategy: ``"G^R"`` (SimCLR: the other view is the positive, every other embedding a
            negative), ``"G^D-"`` (positives as G^R; no embedding of the same partition is a
            negative), ``"G^D"`` (as G^D-, plus positives: both views of the same partition in
            other volumes).
        temperature: τ.

    Returns:
        Scalar loss, the mean over the 2B queries.
    """
    if strategy not in GLOBAL_STRATEGIES:
        raise ValueError(
            f"unknown global contrastive strategy {strategy!r}; expected one of {GLOBAL_STRATEGIES}"
        )
    num = partitions.shape[0]
    if embeddings.shape[0] != 2 * num:
        raise ValueError(f"expected 2 views of {num} samples, got {embeddings.shape[0]} embeddings")
    sample = torch.arange(num, device=embeddings.device).repeat(2)
    part = partitions.repeat(2)
    vol = volumes.repeat(2)
    is_self = torch.eye(2 * num, dtype=torch.bool, device=embeddings.device)
    same_sample = sample[:, None] == sample[None, :]
    same_partition = part[:, None] == part[None, :]
    other_view = same_sample & ~is_self
    if strategy == "G^R":
        positive_mask = other_view
        negative_mask = ~same_sample
    else:
        negative_mask = ~same_partition
        positive_mask = other_view
        if strategy == "G^D":
            positive_mask = other_view | (same_partition & (vol[:, None] != vol[None, :]))
    return info_nce(embeddings, embeddings, embeddings, temperature, positive_mask, negative_mask)


#: Forms of FedCRLD's mutual-information term between shared and private features (SPEC §5).
MI_FORMS: tuple[str, ...] = ("infonce", "symmetric_kl")


@float32_loss
def cross_encoder_info_nce(
    shared: torch.Tensor, private: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """FedCRLD's contrastive mutual-information term, InfoNCE form (SPEC §5), symmetrised.

    Image ``i``'s shared embedding and its private embedding are a positive pair; the other
    images' embeddings from the other encoder are its negatives. Each private embedding is a
    query against the shared candidates and each shared embedding a query against the private
    ones (:func:`info_nce` with a one-element positive set); the two means are averaged.

    Args:
        shared: ``(B, C)`` L2-normalised embeddings of the shared encoder.
        private: ``(B, C)`` L2-normalised embeddings of the private encoder, same image order.
        temperature: τ.

    Returns:
        Scalar. With ``B = 1`` there are no negatives and the term is 0 (still differentiable).
    """
    if shared.shape != private.shape or shared.ndim != 2:
        raise ValueError(
            f"expected two (B, C) embeddings, got {tuple(shared.shape)} and {tuple(private.shape)}"
        )
    same = torch.eye(shared.shape[0], dtype=torch.bool, device=shared.device)
    to_shared = info_nce(private, shared, shared, temperature, same, ~same)
    to_private = info_nce(shared, private, private, temperature, same, ~same)
    return 0.5 * (to_shared + to_private)


@float32_loss
def symmetric_kl(shared: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """Symmetric KL divergence between softmax-normalised features (the authors' code's "MI" term).

    Args:
        shared, private: ``(B, C)`` features (any scale); softmax is taken over ``C``.

    Returns:
        Scalar ``(KL(p_s || p_p) + KL(p_p || p_s)) / 2``, averaged over the batch; 0 when equal.
    """
    log_s = torch.log_softmax(shared, dim=1)
    log_p = torch.log_softmax(private, dim=1)
    kl_sp = (log_s.exp() * (log_s - log_p)).sum(dim=1)
    kl_ps = (log_p.exp() * (log_p - log_s)).sum(dim=1)
    return 0.5 * (kl_sp + kl_ps).mean()


#: The local (decoder) contrastive strategies of Chaitanya et al. (SPEC §4).
LOCAL_STRATEGIES: tuple[str, ...] = ("L^R", "L^D")
#: Where a region's negatives come from: the other regions of its own image (both views;
#: the authors' code) or every other region of the batch.
LOCAL_NEGATIVES: tuple[str, ...] = ("image", "batch")


def local_contrastive_masks(
    volumes: torch.Tensor,
    partitions: torch.Tensor,
    num_regions: int,
    strategy: str = "L^R",
    negatives: str = "image",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks of the local contrastive loss over a two-view region batch.

    Candidates are ordered view-major, then image, then region: candidate
    ``(v * B + b) * R + r`` is region ``r`` of image ``b`` in view ``v`` (``v`` in {0, 1}).

    - ``"L^R"``: the positive of a region is the same region of the same image in the other view;
    - ``"L^D"``: as L^R, plus the same region, in either view, of every image of the same
      partition from another volume;
    - negatives: regions with another region index, of the same image (``"image"``, both
      views) or of any image (``"batch"``). A region is never its own positive or negative.

    Args:
        volumes: ``(B,)`` volume of each image.
        partitions: ``(B,)`` partition of each image.
        num_regions: R.
        strategy: ``"L^R"`` or ``"L^D"``.
        negatives: ``"image"`` or ``"batch"``.

    Returns:
        ``(positive_mask, negative_mask)``, each ``(2BR, 2BR)`` bool, query x candidate.
    """
    if strategy not in LOCAL_STRATEGIES:
        raise ValueError(
            f"unknown local contrastive strategy {strategy!r}; expected one of {LOCAL_STRATEGIES}"
        )
    if negatives not in LOCAL_NEGATIVES:
        raise ValueError(f"unknown local negatives {negatives!r}; expected one of {LOCAL_NEGATIVES}")
    num = volumes.shape[0]
    device = volumes.device
    view = torch.arange(2, device=device).repeat_interleave(num * num_regions)
    image = torch.arange(num, device=device).repeat_interleave(num_regions).repeat(2)
    region = torch.arange(num_regions, device=device).repeat(2 * num)
    vol, part = volumes[image], partitions[image]
    same_region = region[:, None] == region[None, :]
    same_image = image[:, None] == image[None, :]
    positive_mask = same_region & same_image & (view[:, None] != view[None, :])
    if strategy == "L^D":
        positive_mask = positive_mask | (
            same_region & (part[:, None] == part[None, :]) & (vol[:, None] != vol[None, :])
        )
    negative_mask = ~same_region & (same_image if negatives == "image" else torch.ones_like(same_image))
    return positive_mask, negative_mask


def local_contrastive_loss(
    embeddings: torch.Tensor,
    volumes: torch.Tensor,
    partitions: torch.Tensor,
    strategy: str = "L^R",
    temperature: float = 0.1,
    negatives: str = "image",
) -> torch.Tensor:
    """Local contrastive loss of Chaitanya et al. on decoder region embeddings (SPEC §4).

    Args:
        embeddings: ``(2B, R, C)`` unit-norm region embeddings: view 1 of the B images, then
            view 2 in the same order (the views differ in intensity only, so region ``r`` is the
            same place in both).
        volumes: ``(B,)`` volume of each image.
        partitions: ``(B,)`` partition of each image.
        strategy, negatives: see :func:`local_contrastive_masks`.
        temperature: τ.

    Returns:
        Scalar: :func:`info_nce` over every region of every image and view.
    """
    num = volumes.shape[0]
    if embeddings.ndim != 3 or embeddings.shape[0] != 2 * num:
        raise ValueError(
            f"expected (2 x {num}, regions, dim) region embeddings, got shape {tuple(embeddings.shape)}"
        )
    positive_mask, negative_mask = local_contrastive_masks(
        volumes, partitions, embeddings.shape[1], strategy, negatives
    )
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    return info_nce(flat, flat, flat, temperature, positive_mask, negative_mask)


def moco_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.2,
    batch_negatives: bool = True,
) -> torch.Tensor:
    """MoCo's InfoNCE: each query's positive is its own key; the queue holds the negatives.

    Args:
        query: ``(B, C)`` queries ``g(f(x1))`` (unit vectors).
        keys: ``(B, C)`` keys ``g'(f'(x2))`` of the same samples, row for row (no gradient).
        queue: ``(N, C)`` negative keys of earlier steps (may be empty).
        temperature: τ.
        batch_negatives: also use this batch's keys of the *other* samples as negatives
            (a project choice: the first step of a run, with an empty queue, still learns).

    Returns:
        Scalar, the mean over the B queries of ``l(q, {k+}, negatives)``.
    """
    num = query.shape[0]
    positive_mask = torch.eye(num, dtype=torch.bool, device=query.device)
    negatives = torch.cat([keys, queue]) if batch_negatives else queue
    negative_mask = torch.ones(num, negatives.shape[0], dtype=torch.bool, device=query.device)
    if batch_negatives:
        negative_mask[:, :num] = ~positive_mask
    return info_nce(query, keys, negatives, temperature, positive_mask, negative_mask)
