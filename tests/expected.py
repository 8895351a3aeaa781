"""The recommendation computed directly on the shipped data, without any service or network:
what the deployed system must answer."""

from fleet.services import data, model


def recommendations(user, recommend_num, candidate_num):
    tower = data.TwoTower()
    ranking = model.RankingModel(model.generate())
    index = {i: tower.item_embedding(data.item_features(i)) for i in data.items()}
    candidates = data.top_k(tower.user_embedding(data.user_features(user)), index, candidate_num)
    user_row = data.user_features(user)
    scored = [(i, ranking.score(user_row + data.item_features(i))) for i in candidates]
    return sorted(scored, key=lambda pair: (-pair[1], pair[0]))[:recommend_num]


def assert_matches(answer, expected):
    """Same IDs in the same order; scores equal up to float32 (the wire type of prob)."""
    assert [i for i, _ in answer] == [i for i, _ in expected]
    for (_, got), (_, want) in zip(answer, expected):
        assert abs(got - want) < 1e-6
