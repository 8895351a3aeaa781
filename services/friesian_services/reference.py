"""The recommendation computed directly on the shipped data and the seeded model, without any
service or network: what a stack running the built-in data must answer."""

from friesian_services import data, model

# prob travels as float32: scores agree with the reference up to that precision.
SCORE_TOLERANCE = 1e-6


def recommendations(user, recommend_num, candidate_num):
    tower = data.TwoTower()
    ranking = model.RankingModel(model.generate())
    index = {i: tower.item_embedding(data.item_features(i)) for i in data.items()}
    candidates = data.top_k(tower.user_embedding(data.user_features(user)), index, candidate_num)
    user_row = data.user_features(user)
    scored = [(i, ranking.score(user_row + data.item_features(i))) for i in candidates]
    return sorted(scored, key=lambda pair: (-pair[1], pair[0]))[:recommend_num]


def matches(answer, expected):
    """Same IDs in the same order, scores equal up to float32."""
    return ([i for i, _ in answer] == [i for i, _ in expected]
            and all(abs(got - want) < SCORE_TOLERANCE for (_, got), (_, want) in zip(answer, expected)))
