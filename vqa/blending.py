"""The weights of a soft ensemble: the blend of runs' option probabilities, and the search for
the weights that blend best on held-out rows (vqa/ensemble.py reads and writes the runs).

Arrays: `probs` is runs x rows x 4 options, `labels` the rows' true option index (0-3).
"""

from __future__ import annotations

import itertools

import numpy as np

WEIGHT_STEP = 0.05
GRID_MAX_RUNS = 4  # above this the grid grows too fast; coordinate ascent instead
LOG_CLIP = 1e-12


def blend(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted arithmetic mean over runs (axis 0), each row renormalised to sum 1."""
    mixed = np.tensordot(np.asarray(weights, float), probs, axes=1)
    return mixed / mixed.sum(axis=-1, keepdims=True)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of rows whose top option is the true one; None without rows."""
    if not len(labels):
        return None
    return float((probs.argmax(axis=-1) == labels).mean())


def weight_score(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple:
    """What the search maximises, in order: right rows, mean log-probability of the true
    option, nearness to equal weights. Rounded so float noise does not decide a tie."""
    mixed = blend(probs, weights)
    right = int((mixed.argmax(axis=-1) == labels).sum())
    true_probs = mixed[np.arange(len(labels)), labels]
    log_prob = float(np.log(np.clip(true_probs, LOG_CLIP, None)).mean()) if len(labels) else 0.0
    distance = float(np.linalg.norm(weights - 1 / len(weights)))
    return right, round(log_prob, 9), -round(distance, 9)


def simplex_grid(runs: int, step: float = WEIGHT_STEP) -> np.ndarray:
    """Every weight vector of `runs` non-negative multiples of `step` that sum to 1."""
    units = round(1 / step)
    points = [(*cuts, units) for cuts in
              itertools.combinations_with_replacement(range(units + 1), runs - 1)]
    return np.array([np.diff((0, *p)) for p in points], dtype=float) / units


def grid_search(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The best weights on the simplex grid (few runs)."""
    return max(simplex_grid(len(probs)), key=lambda w: weight_score(probs, labels, w))


def coordinate_ascent(probs: np.ndarray, labels: np.ndarray, step: float = WEIGHT_STEP,
                      max_moves: int = 10_000) -> np.ndarray:
    """From equal weights, the best move of `step` weight from one run to another, repeated
    while it gains (many runs, where the grid is too large)."""
    weights = np.full(len(probs), 1 / len(probs))
    best = weight_score(probs, labels, weights)
    for _ in range(max_moves):
        moves = []
        for giver, taker in itertools.permutations(range(len(probs)), 2):
            if weights[giver] <= 0:
                continue
            moved = weights.copy()
            amount = min(step, moved[giver])
            moved[giver] -= amount
            moved[taker] += amount
            moves.append(moved)
        candidate = max(moves, key=lambda w: weight_score(probs, labels, w))
        score = weight_score(probs, labels, candidate)
        if score <= best:
            break
        weights, best = candidate, score
    return weights


def search_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if len(probs) <= GRID_MAX_RUNS:
        return grid_search(probs, labels)
    return coordinate_ascent(probs, labels)


def cross_validated_accuracy(probs: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """2-fold: weights chosen on one seeded half of the rows and scored on the other, both
    ways; the mean of the two accuracies."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = order[:len(order) // 2], order[len(order) // 2:]
    scores = []
    for fit, score in (halves, halves[::-1]):
        weights = search_weights(probs[:, fit], labels[fit])
        scores.append(accuracy(blend(probs[:, score], weights), labels[score]))
    return float(np.mean(scores))
