"""The whole serving stack on four namespace hosts: `fleet deploy all`, recommendations through
Envoy equal to the direct computation, and answers kept when a backend is killed."""

import re
import subprocess
import time

import pytest

from friesian_services import reference, smoke
from tests.conftest import kill_unsupervised, run_fleet, run_smoke, write_inventory

USERS = [0, 5, 42]


LAB_HOSTS = 4


@pytest.fixture(scope="module")
def redis(lab):
    """A Redis server on h0, for the feature service's store."""
    proc = subprocess.Popen(["ip", "netns", "exec", lab.host("h0").namespace, "redis-server", "--port", "6379",
                             "--bind", lab.host("h0").address, "--save", "", "--appendonly", "no",
                             "--protected-mode", "no", "--dir", lab.dir], stdout=subprocess.DEVNULL)
    yield f"{lab.host('h0').address}:6379"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def inventory(lab, redis, tmp_path_factory):
    def service(port, backends, ingress, listen, **vars):
        spec = {"port": port, "backends": backends, "ingress": {"host": ingress, "port": listen}}
        if vars:
            spec["vars"] = vars
        return spec

    data = {"hosts": lab.inventory_hosts(), "services": {
        "feature": service(7072, ["h1", "h2"], "h0", 8082, redisUrl=redis, redisKeyPrefix="fleettest_"),
        "feature_2tower": service(7075, ["h2", "h3"], "h1", 8085),
        "vector_search": service(7074, ["h1", "h3"], "h0", 8084),
        "inference": service(7073, ["h2", "h3"], "h0", 8083),
        "recommender": service(7970, ["h1", "h2"], "h3", 8980),
    }}
    return write_inventory(tmp_path_factory.mktemp("stack"), data)


def recommender_address(lab):
    return f"{lab.host('h3').address}:8980"


def check_recommendations(lab):
    answers = smoke.recommend(recommender_address(lab), USERS, 5, 30)
    assert len(answers) == len(USERS)
    for user, answer in zip(USERS, answers):
        assert reference.matches(answer, reference.recommendations(user, 5, 30))


def test_deploy_all_in_dependency_order(lab, inventory):
    result = run_fleet("deploy", "all", "-i", inventory, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    waves = re.findall(r"^wave \d/3: (.*)$", result.stdout, re.M)
    assert waves == ["feature, feature_2tower, inference", "vector_search", "recommender"]
    for name in ("feature", "feature_2tower", "vector_search", "inference", "recommender"):
        assert re.search(rf"✓ {name}: 2/2 backends healthy in Envoy", result.stdout), name


def test_services_reach_each_other_through_envoy(lab, inventory):
    config = open(f"{lab.host('h1').srv}/fleet/services/recommender/config.yaml").read()
    assert f'recallServiceURL: "{lab.host("h0").address}:8084"' in config
    assert f'featureServiceURL: "{lab.host("h0").address}:8082"' in config
    assert f'rankingServiceURL: "{lab.host("h0").address}:8083"' in config
    config = open(f"{lab.host('h3').srv}/fleet/services/vector_search/config.yaml").read()
    assert f'featureServiceURL: "{lab.host("h1").address}:8085"' in config


def test_recommendations_equal_the_direct_computation(lab, inventory):
    check_recommendations(lab)
    result = run_smoke(recommender_address(lab), "--users", "0,5,42", "--num", "5", "--candidates", "30", "--reference")
    assert result.returncode == 0, result.stdout + result.stderr
    first = reference.recommendations(0, 5, 30)[0][0]
    assert re.search(rf"^ +0 +1 +{first} +0\.\d{{6}}$", result.stdout, re.M)


def test_feature_rows_come_from_redis(lab, redis):
    keys = lab.exec("h0", "redis-cli", "-h", lab.host("h0").address, "--scan", "--pattern", "fleettest_user:*")
    assert len(keys.split()) == 200


def inference_health(lab):
    out = lab.envoy_admin("h0", "/clusters")
    return {parts[1]: parts[3] for parts in (line.split("::") for line in out.splitlines())
            if len(parts) == 4 and parts[0] == "inference_service" and parts[2] == "health_flags"}


def test_answers_continue_with_one_inference_backend_killed(lab, inventory):
    kill_unsupervised(lab, "h2", "inference")  # with its supervisor: it stays down
    for _ in range(20):
        check_recommendations(lab)
    killed = f"{lab.host('h2').address}:7073"
    deadline = time.monotonic() + 10  # health checks every 2 s, out after 2 failures
    while inference_health(lab)[killed] == "healthy":
        assert time.monotonic() < deadline, "Envoy kept the killed backend in rotation"
        time.sleep(0.2)
    assert inference_health(lab)[f"{lab.host('h3').address}:7073"] == "healthy"
    status = run_fleet("status", "inference", "-i", inventory)
    assert status.returncode == 1
    lines = [l for l in status.stdout.splitlines() if "│ inference " in l]
    assert "dead" in lines[0]  # the dead one is listed first
    result = run_fleet("deploy", "inference", "-i", inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^h2 +inference\.inference\.process +changed", result.stdout, re.M)
    assert not re.search(r"^h3 .* changed$", result.stdout, re.M)
    check_recommendations(lab)


def test_second_deploy_all_changes_nothing(lab, inventory):
    result = run_fleet("deploy", "all", "-i", inventory, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no changes" in result.stdout
