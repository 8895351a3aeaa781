"""The shipped dataset, generated deterministically: user and item feature rows, and the
two-tower model that turns them into embeddings. Every host and every test computes the same
values from the same seeds."""

import math
import random

USER_COLUMNS = ["u_age", "u_activity", "u_tenure", "u_affinity"]
ITEM_COLUMNS = ["i_price", "i_popularity", "i_freshness", "i_quality"]
N_USERS = 200
N_ITEMS = 1000
EMBEDDING_DIM = 8
TOWER_SEED = 1337


def user_features(user_id):
    rng = random.Random(f"user-{user_id}")
    return [round(rng.uniform(-1.0, 1.0), 6) for _ in USER_COLUMNS]


def item_features(item_id):
    rng = random.Random(f"item-{item_id}")
    return [round(rng.uniform(-1.0, 1.0), 6) for _ in ITEM_COLUMNS]


def users():
    return range(N_USERS)


def items():
    return range(N_ITEMS)


class TwoTower:
    """User and item towers: embedding = tanh(W x), one seeded weight matrix per tower."""

    def __init__(self, seed=TOWER_SEED):
        rng = random.Random(seed)
        self.user_weights = [[rng.gauss(0, 0.8) for _ in USER_COLUMNS] for _ in range(EMBEDDING_DIM)]
        self.item_weights = [[rng.gauss(0, 0.8) for _ in ITEM_COLUMNS] for _ in range(EMBEDDING_DIM)]

    def user_embedding(self, features):
        return _tower(self.user_weights, features)

    def item_embedding(self, features):
        return _tower(self.item_weights, features)


def _tower(weights, features):
    return [round(math.tanh(sum(w * x for w, x in zip(row, features))), 6) for row in weights]


def inner_product(a, b):
    return sum(x * y for x, y in zip(a, b))


def top_k(query, vectors, k):
    """IDs of the k vectors with the largest inner product with query; ties go to the lower ID."""
    scored = sorted(vectors.items(), key=lambda kv: (-inner_product(query, kv[1]), kv[0]))
    return [item_id for item_id, _ in scored[:k]]
