"""The stack's smoke test: getRecommendIDs through the recommender's Envoy listener.

    python -m friesian_services.smoke 127.0.0.1:8980 --users 0,1,2 --num 5 --candidates 50 [--reference]

Prints one row per recommendation; exit 0 when every user got an answer (with --reference: the
answer computed directly from the built-in data and model), 1 when not, 2 on bad arguments."""

import argparse
import sys

import grpc

from friesian_services import reference
from friesian_services.proto import recommender_pb2, recommender_pb2_grpc


class RecommendFailed(Exception):
    pass


def recommend(address, users, num, candidates, timeout=30.0):
    """getRecommendIDs for the users: a list of [(item ID, score), ...], one per user."""
    request = recommender_pb2.RecommendRequest(recommendNum=num, candidateNum=candidates, ID=users)
    try:
        with grpc.insecure_channel(address) as channel:
            reply = recommender_pb2_grpc.RecommenderStub(channel).getRecommendIDs(request, timeout=timeout)
    except grpc.RpcError as e:
        raise RecommendFailed(f"{e.code().name}: {e.details()}") from None
    return [list(zip(answer.ID, answer.prob)) for answer in reply.IDProbList]


def _user_ids(text):
    try:
        return [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integer IDs, not {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m friesian_services.smoke", description=__doc__.split("\n")[0])
    parser.add_argument("address", help="the recommender's Envoy listener, HOST:PORT")
    parser.add_argument("--users", type=_user_ids, default=[0, 1, 2], help="user IDs, comma-separated (default: 0,1,2)")
    parser.add_argument("--num", type=int, default=5, help="recommendNum (default: 5)")
    parser.add_argument("--candidates", type=int, default=50, help="candidateNum (default: 50)")
    parser.add_argument("--reference", action="store_true",
                        help="also require the answers computed directly from the built-in data and model")
    args = parser.parse_args(argv)
    try:
        answers = recommend(args.address, args.users, args.num, args.candidates)
    except RecommendFailed as e:
        print(f"error: getRecommendIDs through {args.address}: {e}", file=sys.stderr)
        return 1
    print(f"recommendations through {args.address}")
    print(f"{'user':>6} {'rank':>4} {'item':>8} {'score':>10}")
    for user, answer in zip(args.users, answers):
        for rank, (item, score) in enumerate(answer, 1):
            print(f"{user if rank == 1 else '':>6} {rank:>4} {item:>8} {score:>10.6f}")
    if len(answers) != len(args.users):
        print(f"error: {len(answers)} answers for {len(args.users)} users", file=sys.stderr)
        return 1
    wrong = [u for u, a in zip(args.users, answers)
             if args.reference and not reference.matches(a, reference.recommendations(u, args.num, args.candidates))]
    if wrong:
        print(f"error: users {', '.join(map(str, wrong))}: answer differs from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
