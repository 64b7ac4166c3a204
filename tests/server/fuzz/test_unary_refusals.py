"""Hostile unary calls (Predict, Get/Delete/Export, CreateSession, ImportSession of garbage, raw
and truncated request bodies): each gets the code and ErrorInfo reason of DESIGN 1.2, and an
empty Predict (no inputs, num_steps 0) gets no outputs, as streaming nothing does."""

import pytest

from tests.server.fuzz.common import assert_kind_checked, slug
from tests.server.fuzz.unary_cases import UNARY_KINDS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("kind", UNARY_KINDS, ids=slug)
def test_hostile_unary_call_gets_its_contract_outcome(campaign, kind):
    assert_kind_checked(campaign.ledger, kind)
