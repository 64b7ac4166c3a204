"""After the campaign: the server refused more than 10,000 messages, no target session changed,
it is healthy, holds exactly the sessions it should, grew little, logged no error, and exits 0
on SIGTERM."""

import re

import pytest

from tests.server.fuzz.campaign import TARGET_STEPS, TARGETS
from tests.server.fuzz.crafted import CRAFTED_KINDS
from tests.server.fuzz.stream_cases import STREAM_KINDS
from tests.server.fuzz.unary_cases import UNARY_KINDS
from tests.server.fuzz.valid import LIVE_STREAM_KINDS, VALID

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KINDS = {*STREAM_KINDS, *LIVE_STREAM_KINDS, *UNARY_KINDS, *CRAFTED_KINDS, VALID}
# Python logging's ERROR and CRITICAL, tracebacks, grpc's "Unexpected [X] raised by servicer
# method", and gRPC core's own error lines (absl format: E0601 12:00:00.000000 ...).
LOG_ERRORS = re.compile(r" (ERROR|CRITICAL) |Traceback|Exception|Unexpected \[|^[EF]\d{4} ")


def test_more_than_10000_hostile_messages_were_refused(campaign):
    assert sum(campaign.ledger.bad.values()) >= 10_000, campaign.ledger.bad


def test_every_kind_of_message_has_a_test(campaign):
    assert set(campaign.ledger.messages) - KINDS == set()
    assert set(campaign.ledger.failures) - KINDS == set()


def test_the_fuzz_clients_met_no_surprise(campaign):
    assert campaign.client_errors == []


def test_no_target_session_changed(campaign):
    assert not campaign.broken, campaign.broken
    assert len(campaign.targets) == TARGETS
    for session_id, check in campaign.targets.items():
        assert check.error == "", f"{session_id}: {check.error}"
        assert check.next_step == TARGET_STEPS, f"{session_id}: next_step moved"
        assert check.replay_unchanged, f"{session_id}: its replay buffer changed"
        assert check.difference <= 1e-5, f"{session_id}: its state changed"


def test_serving_and_healthy_after_the_fuzz(campaign):
    assert not campaign.broken, campaign.broken
    assert campaign.health == "SERVING"
    assert campaign.predict_difference <= 1e-5


def test_refused_messages_left_no_session_behind(campaign):
    live, expected = campaign.sessions_active, campaign.sessions_expected
    assert live == expected, (
        f"{live} live sessions, expected {expected}: refused messages left some"
    )


def test_memory_stays_bounded(campaign):
    growth = campaign.rss_mb["after the fuzz"] - campaign.rss_mb["before the fuzz"]
    assert growth < 200, f"server memory grew by {growth:.0f} MB: {campaign.rss_mb}"


def test_the_server_logged_no_error(campaign):
    assert "serving on" in campaign.log and "stopped" in campaign.log, "the log was not read"
    errors = [line for line in campaign.log.splitlines() if LOG_ERRORS.search(line)]
    assert not errors, f"{len(errors)} error lines, the first:\n" + "\n".join(errors[:10])


def test_the_server_exits_0_on_sigterm(campaign):
    assert campaign.alive, "the server process died:\n" + campaign.log[-5000:]
    assert campaign.exit_code == 0
