"""recommender.Recommender: per user, recall -> user and item features -> ranking (batched, in
parallel) -> the top recommendNum item IDs with their scores. Every downstream call goes
through that service's Envoy (the *ServiceURL config keys)."""

import json
from concurrent.futures import ThreadPoolExecutor

import grpc

from friesian_services.feature import decode_row
from friesian_services.inference import encode_instances
from friesian_services.proto import (feature_pb2, feature_pb2_grpc, ranking_pb2, ranking_pb2_grpc, recall_pb2,
                                  recall_pb2_grpc, recommender_pb2, recommender_pb2_grpc)
from friesian_services.server import Metered, Timers, serve

SERVICE_NAME = "recommender.Recommender"
DOWNSTREAM_TIMEOUT = 10


class Downstream(Exception):
    """A downstream call failed; the request is answered UNAVAILABLE."""


class Recommender(Metered, recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, recall, feature, ranking, batch_size, parallelism):
        super().__init__(recommender_pb2.ServerMessage)
        self.recall, self.feature, self.ranking = recall, feature, ranking
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=parallelism)
        self.client_timers = Timers()

    def getRecommendIDs(self, request, context):
        with self.timers.time("getRecommendIDs"):
            if request.recommendNum <= 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recommendNum must be positive")
            if request.candidateNum < request.recommendNum:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"candidateNum ({request.candidateNum}) < recommendNum ({request.recommendNum})")
            try:
                answers = [self.recommend(user, request.recommendNum, request.candidateNum) for user in request.ID]
            except Downstream as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            return recommender_pb2.RecommendIDProbs(IDProbList=answers)

    def getClientMetrics(self, request, context):
        return recommender_pb2.ServerMessage(str=self.client_timers.to_json())

    def recommend(self, user_id, recommend_num, candidate_num):
        candidates = list(self._call("recall.searchCandidates", self.recall.searchCandidates,
                                     recall_pb2.Query(userID=user_id, k=candidate_num)).candidate)
        user = self._call("feature.getUserFeatures", self.feature.getUserFeatures, feature_pb2.IDs(ID=[user_id]))
        if not user.b64Feature or not user.b64Feature[0]:
            raise Downstream(f"feature service has no row for user {user_id}")
        user_row = decode_row(user.b64Feature[0])
        items = self._call("feature.getItemFeatures", self.feature.getItemFeatures, feature_pb2.IDs(ID=candidates))
        ids, rows = [], []
        for item_id, encoded in zip(items.ID, items.b64Feature):
            if encoded:  # an item recall knows but the feature store does not cannot be ranked
                ids.append(item_id)
                rows.append(user_row + decode_row(encoded))
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        scores = [score for batch in self.pool.map(self._predict, batches) for score in batch]
        ranked = sorted(zip(ids, scores), key=lambda pair: (-pair[1], pair[0]))[:recommend_num]
        return recommender_pb2.IDProbs(ID=[i for i, _ in ranked], prob=[s for _, s in ranked])

    def _predict(self, rows):
        reply = self._call("ranking.doPredict", self.ranking.doPredict,
                           ranking_pb2.Content(encodedStr=encode_instances(rows)))
        return json.loads(reply.predictStr)

    def _call(self, name, method, request):
        with self.client_timers.time(name):
            try:
                return method(request, timeout=DOWNSTREAM_TIMEOUT)
            except grpc.RpcError as e:
                raise Downstream(f"{name} failed: {e.code().name}: {e.details()}") from None


def main(config):
    for key in ("recallServiceURL", "featureServiceURL", "rankingServiceURL"):
        if not config.get(key):
            raise SystemExit(f"{key} is required")
    servicer = Recommender(
        recall=recall_pb2_grpc.RecallStub(grpc.insecure_channel(config["recallServiceURL"])),
        feature=feature_pb2_grpc.FeatureStub(grpc.insecure_channel(config["featureServiceURL"])),
        ranking=ranking_pb2_grpc.RankingStub(grpc.insecure_channel(config["rankingServiceURL"])),
        batch_size=int(config.get("inferenceBatch", 16)),
        parallelism=int(config.get("modelParallelism", 4)))
    serve(config, lambda server: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server),
          [SERVICE_NAME])
