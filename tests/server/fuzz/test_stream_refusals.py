"""Hostile StreamSteps messages, on streams of their own and on well-behaved sessions' live
streams: each refused with the code, ErrorInfo reason and expected_step the step-rule model
gives, with an error text naming what was expected, and no response before the error."""

import pytest

from tests.server.fuzz.common import assert_kind_checked, slug
from tests.server.fuzz.stream_cases import STREAM_KINDS
from tests.server.fuzz.valid import LIVE_STREAM_KINDS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("kind", STREAM_KINDS, ids=slug)
def test_hostile_stream_message_is_refused(campaign, kind):
    assert_kind_checked(campaign.ledger, kind)


@pytest.mark.parametrize("kind", LIVE_STREAM_KINDS, ids=slug)
def test_bad_message_on_a_live_stream_is_refused(campaign, kind):
    assert_kind_checked(campaign.ledger, kind)
