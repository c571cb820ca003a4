"""FedMoCo's self-adaptive aggregation from representational similarity analysis (RSA; SPEC §3).

At each site a fixed probe set of n of its own samples is embedded twice: with the
global model the site received and with its model after local training. Each
embedding gives a representational dissimilarity matrix (:func:`rdm`, ``1 - Pearson``
correlation between the embeddings of two samples); the site reports the Spearman
correlation rho_k of the two matrices' upper triangles (:func:`rsa_similarity`), one
float. The server weights site k's model by (:func:`rsa_weights`)::

    w_k ∝ softmax_k(∓rho_k / T) · n_k          (normalised to sum 1)

with ``-`` (``direction="dissimilar"``, the default: the sites whose representations moved
furthest from the global one count more) or ``+`` (``"similar"``), T the temperature and
n_k the samples the site saw. The formula, T and the direction are project choices: the
paper's own could not be read (SPEC §3).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Values of ``rsa_direction``.
DIRECTIONS: tuple[str, ...] = ("dissimilar", "similar")


def rdm(embeddings: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix: ``1 - Pearson correlation`` between rows.

    Args:
        embeddings: ``(n, C)`` one embedding per probe sample, C >= 2.

    Returns:
        ``(n, n)`` float64 in [0, 2], zero diagonal.

    Raises:
        ValueError: a row is constant (its correlation is undefined).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected (n, C >= 2) embeddings, got shape {x.shape}")
    centred = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    if (norms == 0).any():
        raise ValueError("an embedding is constant across its dimensions; its correlation is undefined")
    unit = centred / norms[:, None]
    dissimilarity = 1.0 - np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(dissimilarity, 0.0)
    return dissimilarity


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # start index of each run of equal values, and the run each sorted position belongs to
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    run = np.cumsum(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])) - 1
    ends = np.concatenate([starts[1:], [len(values)]])
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = average[run]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long 1-D arrays (Pearson of their average ranks).

    Raises:
        ValueError: fewer than 2 values, different lengths, or a constant array.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two arrays of one length >= 2, got {a.shape} and {b.shape}")
    ra, rb = rank(a) - (a.size + 1) / 2.0, rank(b) - (b.size + 1) / 2.0
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    if denominator == 0:
        raise ValueError("Spearman correlation is undefined for a constant array")
    return float((ra * rb).sum() / denominator)


def rsa_similarity(local: np.ndarray, reference: np.ndarray) -> float:
    """rho: Spearman correlation between the upper triangles of the two embeddings' RDMs.

    Args:
        local: ``(n, C)`` probe embeddings by the site's trained model.
        reference: ``(n, C')`` the same probe samples embedded by the received global model.

    Returns:
        rho in [-1, 1]; 1 when the two models order the probe pairs' dissimilarities alike; 0 when
        either model gives every pair the same dissimilarity (within 1e-9: a collapsed
        representation orders nothing, so no agreement can be measured).
    """
    if len(local) != len(reference) or len(local) < 3:
        raise ValueError(f"need the same >= 3 probe samples in both, got {len(local)} and {len(reference)}")
    upper = np.triu_indices(len(local), k=1)
    a, b = rdm(local)[upper], rdm(reference)[upper]
    if np.ptp(a) < 1e-9 or np.ptp(b) < 1e-9:
        return 0.0
    return spearman(a, b)


def rsa_weights(
    rho: Mapping[str, float],
    num_samples: Mapping[str, int],
    temperature: float = 0.1,
    direction: str = "dissimilar",
) -> dict[str, float]:
    """Aggregation weights from the sites' rho: ``softmax(∓rho/T) · n``, normalised to sum 1.

    Args:
        rho: site -> rho_k.
        num_samples: site -> n_k (samples seen this round), same sites.
        temperature: T > 0.
        direction: ``"dissimilar"`` (weight on ``-rho``) or ``"similar"`` (``+rho``).

    Returns:
        site -> weight, summing to 1 (equal weights when every n_k is 0).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"rsa_direction must be one of {DIRECTIONS}, got {direction!r}")
    if temperature <= 0:
        raise ValueError(f"rsa_temperature must be > 0, got {temperature}")
    if set(rho) != set(num_samples) or not rho:
        raise ValueError(
            f"rho and sample counts must cover the same sites, got {sorted(rho)} and {sorted(num_samples)}"
        )
    sites = sorted(rho)
    sign = -1.0 if direction == "dissimilar" else 1.0
    logits = np.array([sign * float(rho[s]) / temperature for s in sites])
    softmax = np.exp(logits - logits.max())
    softmax /= softmax.sum()
    counts = np.array([float(num_samples[s]) for s in sites])
    raw = softmax * counts if counts.sum() > 0 else softmax
    return {s: float(w) for s, w in zip(sites, raw / raw.sum())}
