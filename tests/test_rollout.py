"""Rolling-deploy decisions (pure): batch sizes, batches, and the go/stop/rollback choices, with
the invariant checked over many services by simulating rollouts."""

import itertools
import random

import pytest

from fleet import rollout
from fleet.rollout import GO, ROLLBACK, STOP, Decision

HOSTS = [f"h{i}" for i in range(20)]


@pytest.mark.parametrize("spec, count, size", [
    (None, 1, 1), (None, 2, 1), (None, 3, 1), (None, 7, 1), (None, 8, 2), (None, 20, 5), (None, 100, 25),
    ({"batch": 1}, 20, 1), ({"batch": 3}, 20, 3), ({"batch": 5}, 3, 2), ({"batch": "50%"}, 3, 1),
    ({"batch": "100%"}, 4, 3), ({"batch": "100%"}, 1, 1), ({"batch": "1%"}, 20, 1), ({}, 20, 5),
])
def test_batch_size_is_at_least_one_and_leaves_one_serving(spec, count, size):
    assert rollout.batch_size(spec, count) == size


@pytest.mark.parametrize("spec, message", [
    ({"batch": 0}, "rollout.batch: expected a whole number >= 1"),
    ({"batch": -2}, "rollout.batch"),
    ({"batch": True}, "rollout.batch"),
    ({"batch": 1.5}, "rollout.batch"),
    ({"batch": "0%"}, "rollout.batch"),
    ({"batch": "101%"}, "rollout.batch"),
    ({"batch": "25 %"}, "rollout.batch"),
    ({"batch": "two"}, "rollout.batch"),
    ({"batch": 1, "surge": True}, "rollout.surge: unknown key"),
    ([1], "rollout: expected a mapping"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(rollout.RolloutError, match=message):
        rollout.batch_size(spec, 4)


def test_batches_follow_the_inventory_order_unhealthy_first():
    plan = rollout.plan(["h0", "h1", "h2", "h3", "h4"], changed=["h4", "h0", "h1", "h3"], unhealthy=["h3"],
                        spec={"batch": 2})
    assert plan == rollout.Plan(rollout.ROLLING, 2, (("h3",), ("h0", "h1"), ("h4",)))


def test_a_single_backend_surges():
    assert rollout.plan(["h0"], changed=["h0"]) == rollout.Plan(rollout.SURGE, 1, (("h0",),))
    assert rollout.before_batch(rollout.plan(["h0"], ["h0"]), ["h0"], ["h0"], healthy=[]) == Decision(GO)


def test_nothing_changed_means_no_batches():
    assert rollout.plan(["h0", "h1"], changed=[]).batches == ()
    assert rollout.plan(["h0"], changed=[]).batches == ()


def test_unknown_or_repeated_backends_are_refused():
    with pytest.raises(ValueError, match="not backends"):
        rollout.plan(["h0", "h1"], changed=["h9"])
    with pytest.raises(ValueError, match="listed twice"):
        rollout.plan(["h0", "h0"], changed=["h0"])


def test_a_batch_that_would_leave_too_few_healthy_stops():
    backends = ["h0", "h1", "h2"]
    plan = rollout.plan(backends, changed=backends, spec={"batch": 1})
    # h2 went down meanwhile (not by this rollout): restarting h0 would leave only h1.
    decision = rollout.before_batch(plan, ["h0"], backends, healthy=["h0", "h1"])
    assert decision.action == STOP
    assert decision.reason == "restarting h0 would leave 1 of 3 backends healthy, fewer than 2; not healthy: h2"
    assert rollout.before_batch(plan, ["h0"], backends, healthy=backends) == Decision(GO)
    # Restarting h2 itself takes nothing healthy out: it may go.
    assert rollout.before_batch(plan, ["h2"], backends, healthy=["h0", "h1"]) == Decision(GO)


def test_a_batch_that_does_not_come_up_is_rolled_back():
    assert rollout.after_batch(["h0", "h1"], {"h0": None, "h1": None}) == Decision(GO)
    decision = rollout.after_batch(["h0", "h1", "h2"], {"h0": None, "h1": "not listening on 7073 after 20s",
                                                        "h2": "exited (exit:1)"})
    assert decision == Decision(ROLLBACK, "h1: not listening on 7073 after 20s (and 1 more)", ("h0", "h1", "h2"))
    with pytest.raises(ValueError, match="no result"):
        rollout.after_batch(["h0"], {})


def simulate(backends, changed, unhealthy, spec, fails_at):
    """Runs the decisions as a deploy would; returns (healthy counts seen during batches, the
    last decision, the backends on the new release)."""
    plan = rollout.plan(backends, changed, unhealthy, spec)
    healthy = set(backends) - set(unhealthy)
    seen, new, decision = [], set(), Decision(GO)
    for i, batch in enumerate(plan.batches):
        decision = rollout.before_batch(plan, batch, backends, sorted(healthy))
        if decision.action != GO:
            break
        healthy -= set(batch)
        seen.append(len(healthy))
        results = {b: ("exited (exit:1)" if i == fails_at and b == batch[0] else None) for b in batch}
        decision = rollout.after_batch(batch, results)
        healthy |= set(batch)  # came up, or was rolled back to the previous release
        if decision.action == ROLLBACK:
            break
        new |= set(batch)
    return plan, seen, decision, new


def test_the_invariant_holds_over_many_services():
    rng = random.Random(9)
    specs = [None, {"batch": 1}, {"batch": 2}, {"batch": 7}, {"batch": "10%"}, {"batch": "50%"}, {"batch": "100%"}]
    for count, spec in itertools.product(range(1, 21), specs):
        for _ in range(5):
            backends = HOSTS[:count]
            changed = rng.sample(backends, rng.randint(0, count))
            unhealthy = rng.sample(changed, rng.randint(0, len(changed) // 3))
            fails_at = rng.choice([None, 0, 1, 2])
            plan, seen, decision, new = simulate(backends, changed, unhealthy, spec, fails_at)
            size = plan.size
            assert size >= 1
            assert sorted(b for batch in plan.batches for b in batch) == sorted(changed)  # each once
            assert all(batch for batch in plan.batches)
            if count > 1:
                # Never fewer than N - B healthy, unless fewer were healthy before the rollout.
                floor = min(count - size, count - len(unhealthy))
                assert all(healthy >= floor for healthy in seen), (count, spec, seen)
                assert all(len(set(batch) - set(unhealthy)) <= size for batch in plan.batches)
            if fails_at is None or fails_at >= len(plan.batches):
                assert decision == Decision(GO) and new == set(changed)
            else:
                # Stopped at the failing batch: the batches after it keep the old release.
                assert decision.action == ROLLBACK
                assert decision.hosts == plan.batches[fails_at]
                assert new == {b for batch in plan.batches[:fails_at] for b in batch}
