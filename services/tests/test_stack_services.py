"""The five services wired together in this process over real gRPC on loopback: feature rows,
two-tower embeddings (embedded store and a real Redis), recall, ranking, recommender."""

import json
import shutil
import socket
import subprocess
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import empty_pb2

from friesian_services import data, feature, inference, model, recall, recommender, reference, smoke
from friesian_services.kvstore import EmbeddedStore, RedisStore
from friesian_services.proto import (feature_pb2, feature_pb2_grpc, ranking_pb2_grpc, recall_pb2, recall_pb2_grpc,
                                     recommender_pb2, recommender_pb2_grpc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(register):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def feature_servicer(store, prefix, service_type):
    feature.load_initial_data(store, prefix)
    return feature.Feature(store, prefix, service_type, data.TwoTower())


@pytest.fixture(scope="module")
def stack():
    servers = []

    def run(register):
        server, address = start(register)
        servers.append(server)
        return grpc.insecure_channel(address), address

    kv, kv_addr = run(lambda s: feature_pb2_grpc.add_FeatureServicer_to_server(
        feature_servicer(EmbeddedStore(), "", "kv"), s))
    tower, tower_addr = run(lambda s: feature_pb2_grpc.add_FeatureServicer_to_server(
        feature_servicer(EmbeddedStore(), "2tower_", "inference"), s))
    recall_servicer = recall.Recall(data.TwoTower(), feature_pb2_grpc.FeatureStub(tower))
    rec, rec_addr = run(lambda s: recall_pb2_grpc.add_RecallServicer_to_server(recall_servicer, s))
    ranking = inference.Ranking(model.RankingModel(model.generate()))
    rank, rank_addr = run(lambda s: ranking_pb2_grpc.add_RankingServicer_to_server(ranking, s))
    recommender_servicer = recommender.Recommender(recall_pb2_grpc.RecallStub(rec), feature_pb2_grpc.FeatureStub(kv),
                                                   ranking_pb2_grpc.RankingStub(rank), batch_size=7, parallelism=3)
    top, top_addr = run(lambda s: recommender_pb2_grpc.add_RecommenderServicer_to_server(recommender_servicer, s))
    yield {"kv": kv, "tower": tower, "recall": rec, "recommender": top, "recommender_address": top_addr}
    for server in servers:
        server.stop(None)


def rows(reply):
    return {i: feature.decode_row(b) if b else None for i, b in zip(reply.ID, reply.b64Feature)}


def test_feature_rows_and_missing_ids(stack):
    stub = feature_pb2_grpc.FeatureStub(stack["kv"])
    reply = stub.getUserFeatures(feature_pb2.IDs(ID=[3, 5, 99999]))
    assert list(reply.colNames) == data.USER_COLUMNS
    assert rows(reply) == {3: data.user_features(3), 5: data.user_features(5), 99999: None}
    items = stub.getItemFeatures(feature_pb2.IDs(ID=[7]))
    assert list(items.colNames) == data.ITEM_COLUMNS and rows(items) == {7: data.item_features(7)}


def test_two_tower_embeddings(stack):
    stub = feature_pb2_grpc.FeatureStub(stack["tower"])
    reply = stub.getUserFeatures(feature_pb2.IDs(ID=[4]))
    assert list(reply.colNames) == ["embedding"]
    tower = data.TwoTower()
    assert rows(reply)[4] == tower.user_embedding(data.user_features(4))
    assert rows(stub.getItemFeatures(feature_pb2.IDs(ID=[9])))[9] == tower.item_embedding(data.item_features(9))


def test_recall_is_the_true_top_k(stack):
    stub = recall_pb2_grpc.RecallStub(stack["recall"])
    tower = data.TwoTower()
    index = {i: tower.item_embedding(data.item_features(i)) for i in data.items()}
    for user in (0, 17, 123):
        want = data.top_k(tower.user_embedding(data.user_features(user)), index, 25)
        assert list(stub.searchCandidates(recall_pb2.Query(userID=user, k=25)).candidate) == want


def test_add_item_enters_the_index(stack):
    stub = recall_pb2_grpc.RecallStub(stack["recall"])
    tower = data.TwoTower()
    user_embedding = tower.user_embedding(data.user_features(1))
    # Among fresh item IDs, the one this user's embedding likes best must come out first.
    fresh = range(50_000, 70_000)
    best = max(fresh, key=lambda i: (data.inner_product(user_embedding, tower.item_embedding(data.item_features(i))), -i))
    index = {i: tower.item_embedding(data.item_features(i)) for i in data.items()}
    index[best] = tower.item_embedding(data.item_features(best))
    assert data.top_k(user_embedding, index, 1) == [best], "test data: pick a range with an item beating the catalogue"
    assert best not in stub.searchCandidates(recall_pb2.Query(userID=1, k=5)).candidate
    stub.addItem(recall_pb2.Item(itemID=best))
    assert stub.searchCandidates(recall_pb2.Query(userID=1, k=5)).candidate[0] == best


def test_recommendations_equal_the_direct_computation(stack):
    stub = recommender_pb2_grpc.RecommenderStub(stack["recommender"])
    reply = stub.getRecommendIDs(recommender_pb2.RecommendRequest(recommendNum=6, candidateNum=40, ID=[2, 8, 150]))
    assert len(reply.IDProbList) == 3
    for user, answer in zip([2, 8, 150], reply.IDProbList):
        assert reference.matches(list(zip(answer.ID, answer.prob)), reference.recommendations(user, 6, 40))
    metrics = json.loads(stub.getClientMetrics(empty_pb2.Empty()).str)
    assert {m["name"] for m in metrics} >= {"recall.searchCandidates", "ranking.doPredict"}


def test_smoke_script_asks_the_recommender_and_checks_the_reference(stack, capsys):
    address = stack["recommender_address"]
    assert smoke.main([address, "--users", "2,8", "--num", "4", "--candidates", "20", "--reference"]) == 0
    out = capsys.readouterr().out
    assert f"recommendations through {address}" in out
    assert len([line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]) == 8
    first = reference.recommendations(2, 4, 20)[0][0]
    assert f"     2    1 {first:>8}" in out


def test_smoke_script_fails_when_nothing_answers(capsys):
    assert smoke.main([f"127.0.0.1:{free_port()}", "--users", "1"]) == 1
    assert "getRecommendIDs through" in capsys.readouterr().err


def test_candidate_num_below_recommend_num_is_failed_precondition(stack):
    stub = recommender_pb2_grpc.RecommenderStub(stack["recommender"])
    with pytest.raises(grpc.RpcError) as info:
        stub.getRecommendIDs(recommender_pb2.RecommendRequest(recommendNum=10, candidateNum=5, ID=[1]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_downstream_failure_is_unavailable():
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    servicer = recommender.Recommender(recall_pb2_grpc.RecallStub(grpc.insecure_channel(dead)),
                                       feature_pb2_grpc.FeatureStub(grpc.insecure_channel(dead)),
                                       ranking_pb2_grpc.RankingStub(grpc.insecure_channel(dead)), 8, 2)
    server, address = start(lambda s: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, s))
    try:
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
            recommender_pb2_grpc.RecommenderStub(channel).getRecommendIDs(
                recommender_pb2.RecommendRequest(recommendNum=2, candidateNum=4, ID=[1]), timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "recall.searchCandidates failed" in info.value.details()
    finally:
        server.stop(None)


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_feature_service_on_redis(redis_url):
    store = RedisStore(redis_url)
    servicer = feature_servicer(store, "fleet_", "kv")
    assert not store.is_empty("fleet_user:0")
    assert store.get_many(["fleet_item:12", "fleet_item:999999"]) == [data.item_features(12), None]
    # A row changed in Redis is what the service answers: it reads the store, not a copy.
    store.put_many({"fleet_user:3": [9.0, 9.0, 9.0, 9.0]})
    server, address = start(lambda s: feature_pb2_grpc.add_FeatureServicer_to_server(servicer, s))
    try:
        with grpc.insecure_channel(address) as channel:
            reply = feature_pb2_grpc.FeatureStub(channel).getUserFeatures(feature_pb2.IDs(ID=[3, 4]))
        assert rows(reply) == {3: [9.0, 9.0, 9.0, 9.0], 4: data.user_features(4)}
    finally:
        server.stop(None)
    feature.load_initial_data(store, "fleet_")  # a filled store is left alone
    assert store.get_many(["fleet_user:3"]) == [[9.0, 9.0, 9.0, 9.0]]
