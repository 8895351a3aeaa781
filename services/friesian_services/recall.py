"""recall.Recall: the exact top-k items by inner product with the user's embedding.

The user embedding comes from the two-tower feature service (through its Envoy) when
getFeatureFromFeatureService is true, else from the local tower; the item index is built from
the shipped dataset at start, and addItem adds an item's embedding to it."""

import threading

import grpc
from google.protobuf import empty_pb2

from friesian_services import data
from friesian_services.feature import decode_row
from friesian_services.proto import feature_pb2, feature_pb2_grpc, recall_pb2, recall_pb2_grpc
from friesian_services.server import Metered, serve

SERVICE_NAME = "recall.Recall"
DOWNSTREAM_TIMEOUT = 10


class Recall(Metered, recall_pb2_grpc.RecallServicer):
    def __init__(self, tower, feature_stub=None):
        super().__init__(recall_pb2.ServerMessage)
        self.tower, self.feature_stub = tower, feature_stub
        self.index = {i: tower.item_embedding(data.item_features(i)) for i in data.items()}
        self.lock = threading.Lock()

    def searchCandidates(self, request, context):
        with self.timers.time("searchCandidates"):
            if request.k <= 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k must be positive")
            embedding = self._user_embedding(request.userID, context)
            with self.lock:
                index = dict(self.index)
            return recall_pb2.Candidates(candidate=data.top_k(embedding, index, request.k))

    def addItem(self, request, context):
        with self.timers.time("addItem"):
            embedding = self.tower.item_embedding(data.item_features(request.itemID))
            with self.lock:
                self.index[request.itemID] = embedding
            return empty_pb2.Empty()

    def _user_embedding(self, user_id, context):
        if self.feature_stub is None:
            return self.tower.user_embedding(data.user_features(user_id))
        try:
            reply = self.feature_stub.getUserFeatures(feature_pb2.IDs(ID=[user_id]), timeout=DOWNSTREAM_TIMEOUT)
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"feature service: {e.code().name}: {e.details()}")
        if not reply.b64Feature or not reply.b64Feature[0]:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no embedding for user {user_id}")
        return decode_row(reply.b64Feature[0])


def main(config):
    stub = None
    if config.get("getFeatureFromFeatureService", True):
        if not config.get("featureServiceURL"):
            raise SystemExit("featureServiceURL is required when getFeatureFromFeatureService is true")
        stub = feature_pb2_grpc.FeatureStub(grpc.insecure_channel(config["featureServiceURL"]))
    servicer = Recall(data.TwoTower(), stub)
    serve(config, lambda server: recall_pb2_grpc.add_RecallServicer_to_server(servicer, server), [SERVICE_NAME])
