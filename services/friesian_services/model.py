"""The ranking model: a small two-layer perceptron with weights drawn from a fixed seed.

Deterministic, so every build of the artifact and every test computes the same scores.
"""

import json
import math
import random

INPUT_DIM = 8
HIDDEN_DIM = 16
SEED = 20211


def generate(seed=SEED, input_dim=INPUT_DIM, hidden_dim=HIDDEN_DIM):
    rng = random.Random(seed)

    def layer(rows, cols):
        scale = 1.0 / math.sqrt(cols)
        return [[rng.uniform(-scale, scale) for _ in range(cols)] for _ in range(rows)]

    return {
        "inputDim": input_dim,
        "w1": layer(hidden_dim, input_dim),
        "b1": [rng.uniform(-0.1, 0.1) for _ in range(hidden_dim)],
        "w2": layer(1, hidden_dim)[0],
        "b2": rng.uniform(-0.1, 0.1),
    }


class RankingModel:
    def __init__(self, params):
        self.params = params
        self.input_dim = params["inputDim"]

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls(json.load(f))

    def score(self, row):
        """Click probability of one feature row: sigmoid(w2 . relu(W1 x + b1) + b2)."""
        if len(row) != self.input_dim:
            raise ValueError(f"feature row has {len(row)} values, model expects {self.input_dim}")
        p = self.params
        hidden = [max(0.0, sum(w * x for w, x in zip(ws, row)) + b) for ws, b in zip(p["w1"], p["b1"])]
        logit = sum(w * h for w, h in zip(p["w2"], hidden)) + p["b2"]
        return 1.0 / (1.0 + math.exp(-logit))
