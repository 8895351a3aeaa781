"""Every read of a host session has a deadline: the local connector (a real /bin/sh, no host
needed) fails a silent session or step with ConnectFailed naming what it waited for, and a
session that missed a deadline is not used or waited for again. (The same on namespace hosts
over SSH: tests/test_faults_hosts.py, "hangs".)"""

import pytest

from fleet import commands
from fleet.connection import ConnectFailed, LocalConnection


@pytest.fixture
def local():
    conn = LocalConnection()
    yield conn
    conn.close()


def test_a_session_that_never_gets_ready_fails(local):
    with pytest.raises(ConnectFailed, match=r"no answer from the host session within 1 s \(start of the session\)"):
        local.start_session("exec sleep 5", 1)


def test_a_silent_step_fails_and_the_session_is_done_for(local, tmp_path):
    session = local.start_session(commands.session(str(tmp_path), "test", lock=False), 10)
    assert session.run("echo hello", 10, "greeting").output == "hello"
    with pytest.raises(ConnectFailed, match=r"no answer from the host session within 1 s \(facts\)"):
        session.run("sleep 5", 1, "facts")
    with pytest.raises(ConnectFailed, match=r"within 1 s \(facts\)"):
        session.run("echo again", 10, "greeting")  # its output would be out of step: never used again
    assert session.close() is None
