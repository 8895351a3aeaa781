"""A client load through Envoy for tests and benchmarks: threads, each with its own long-lived
gRPC channel, calling doPredict until stopped; counts what was sent and what failed."""

import threading
from collections import Counter

import grpc

from friesian_services.inference import encode_instances
from friesian_services.proto import ranking_pb2, ranking_pb2_grpc


class Load:
    def __init__(self, address, channels=4, deadline=10):
        self.address, self.deadline = address, deadline
        self.sent = 0
        self.errors = Counter()  # status code name -> count
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(channels)]

    @property
    def failed(self):
        return sum(self.errors.values())

    def _client(self):
        request = ranking_pb2.Content(encodedStr=encode_instances([[0.2] * 8]))
        with grpc.insecure_channel(self.address) as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)
            while not self._stop.is_set():
                error = None
                try:
                    stub.doPredict(request, timeout=self.deadline)
                except grpc.RpcError as e:
                    error = e.code().name
                with self._lock:
                    self.sent += 1
                    if error:
                        self.errors[error] += 1

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.deadline + 5)

    def __str__(self):
        return f"{self.sent} requests sent, {self.failed} failed {dict(self.errors) or ''}".strip()
