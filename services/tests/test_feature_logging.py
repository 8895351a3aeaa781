"""The feature service never logs Redis credentials (issue 8, finding 5)."""

import socket
import subprocess
import sys

import pytest
import yaml

from friesian_services.kvstore import redacted
from tests.conftest import REPO


@pytest.mark.parametrize("url, shown", [
    ("redis://:TopSecret-PW-2@10.0.0.5:6379", "redis://:***@10.0.0.5:6379"),
    ("redis://app:TopSecret-PW-2@redis.internal/0", "redis://app:***@redis.internal/0"),
    ("10.0.0.5:6379", "10.0.0.5:6379"),
    ("redis://10.0.0.5", "redis://10.0.0.5"),
])
def test_redacted_hides_only_the_password(url, shown):
    assert redacted(url) == shown


def closed_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_redis_is_reported_without_its_password(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"servicePort": closed_loopback_port(), "bindAddress": "127.0.0.1",
                                      "redisUrl": f"redis://:TopSecret-PW-2@127.0.0.1:{closed_loopback_port()}"}))
    proc = subprocess.run([sys.executable, "-m", "friesian_services", "feature", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0
    assert "feature store redis://:***@127.0.0.1:" in proc.stderr
    assert "TopSecret" not in proc.stdout + proc.stderr
