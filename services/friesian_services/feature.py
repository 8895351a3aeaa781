"""feature.Feature: user and item feature rows from a store (serviceType kv), or their two-tower
embeddings (serviceType inference, the feature_2tower instance).

Each b64Feature entry is base64 of the JSON list of the row's values, in colNames order; an ID
with no row gets an empty string."""

import base64
import json

import grpc

from friesian_services import data
from friesian_services.kvstore import RedisError, open_store, redacted
from friesian_services.proto import feature_pb2, feature_pb2_grpc
from friesian_services.server import Metered, serve

SERVICE_NAME = "feature.Feature"
SERVICE_TYPES = ("kv", "inference")


def encode_row(values):
    return base64.b64encode(json.dumps(values).encode()).decode()


def decode_row(encoded):
    return json.loads(base64.b64decode(encoded))


class Feature(Metered, feature_pb2_grpc.FeatureServicer):
    def __init__(self, store, prefix, service_type, tower):
        super().__init__(feature_pb2.ServerMessage)
        self.store, self.prefix, self.service_type, self.tower = store, prefix, service_type, tower

    def getUserFeatures(self, request, context):
        with self.timers.time("getUserFeatures"):
            return self._lookup(request.ID, "user", data.USER_COLUMNS, self.tower.user_embedding, context)

    def getItemFeatures(self, request, context):
        with self.timers.time("getItemFeatures"):
            return self._lookup(request.ID, "item", data.ITEM_COLUMNS, self.tower.item_embedding, context)

    def _lookup(self, ids, kind, columns, embed, context):
        ids = list(ids)
        try:
            rows = self.store.get_many([f"{self.prefix}{kind}:{i}" for i in ids])
        except (OSError, RedisError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"feature store: {e}")
        if self.service_type == "inference":
            rows, columns = [embed(r) if r is not None else None for r in rows], ["embedding"]
        return feature_pb2.Features(colNames=columns, ID=ids,
                                    b64Feature=[encode_row(r) if r is not None else "" for r in rows])


def load_initial_data(store, prefix):
    """Fills an empty store with the shipped dataset; a filled one (a shared Redis) is left alone."""
    if not store.is_empty(f"{prefix}user:0"):
        return
    rows = {f"{prefix}user:{u}": data.user_features(u) for u in data.users()}
    rows.update({f"{prefix}item:{i}": data.item_features(i) for i in data.items()})
    store.put_many(rows)


def main(config):
    service_type = config.get("serviceType", "kv")
    if service_type not in SERVICE_TYPES:
        raise SystemExit(f"serviceType must be one of {', '.join(SERVICE_TYPES)}, not {service_type!r}")
    store = open_store(config)
    prefix = config.get("redisKeyPrefix", "") or ""
    try:
        load_initial_data(store, prefix)
    except (OSError, RedisError) as e:
        raise SystemExit(f"feature store {redacted(config.get('redisUrl') or '')}: {e}")
    servicer = Feature(store, prefix, service_type, data.TwoTower())
    serve(config, lambda server: feature_pb2_grpc.add_FeatureServicer_to_server(servicer, server), [SERVICE_NAME])
