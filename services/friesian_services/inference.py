"""ranking.Ranking: scores batches of feature rows with the ranking model.

doPredict's encodedStr is base64 of JSON {"instances": [[float, ...], ...]}; predictStr is the
JSON list of scores, one per instance, in order.
"""

import base64
import binascii
import json

import grpc

from friesian_services import model
from friesian_services.proto import ranking_pb2, ranking_pb2_grpc
from friesian_services.server import Metered, serve

SERVICE_NAME = "ranking.Ranking"


def encode_instances(rows):
    return base64.b64encode(json.dumps({"instances": rows}).encode()).decode()


def decode_instances(encoded):
    try:
        instances = json.loads(base64.b64decode(encoded, validate=True))["instances"]
    except (binascii.Error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"encodedStr is not base64 JSON with 'instances': {e}") from None
    if not isinstance(instances, list):
        raise ValueError("'instances' must be a list of feature rows")
    return instances


class Ranking(Metered, ranking_pb2_grpc.RankingServicer):
    def __init__(self, model):
        super().__init__(ranking_pb2.ServerMessage)
        self.model = model

    def doPredict(self, request, context):
        with self.timers.time("doPredict"):
            try:
                scores = [self.model.score(row) for row in decode_instances(request.encodedStr)]
            except (ValueError, TypeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return ranking_pb2.Prediction(predictStr=json.dumps(scores))


def load_model(config):
    """modelPath on the host if the config names one, else the seeded built-in model."""
    if config.get("modelPath"):
        return model.RankingModel.load(config["modelPath"])
    return model.RankingModel(model.generate())


def main(config):
    servicer = Ranking(load_model(config))
    serve(config, lambda server: ranking_pb2_grpc.add_RankingServicer_to_server(servicer, server), [SERVICE_NAME])
