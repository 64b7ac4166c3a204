"""Twenty well-behaved sessions streaming beside the hostile traffic: every response as the
step-rule model says (header, replayed rows), every output equal to the offline model."""

import pytest

from tests.server.fuzz.valid import VALID, offline_mismatches

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_every_valid_message_is_answered_as_the_step_rule_says(campaign):
    assert not campaign.ledger.failures.get(VALID), campaign.ledger.report(VALID)
    silent = [s.index for s in campaign.valid if not s.messages]
    assert campaign.valid and not silent, f"sessions {silent} sent nothing"


def test_valid_outputs_equal_the_offline_model(campaign, bundled_model):
    mismatches = [m for s in campaign.valid for m in offline_mismatches(s, bundled_model)]
    assert not mismatches, f"{len(mismatches)} segments differ:\n" + "\n".join(mismatches[:10])
    assert sum(s.next_step for s in campaign.valid) > 0
