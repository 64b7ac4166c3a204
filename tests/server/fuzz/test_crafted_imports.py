"""ImportSession of a real export with one field made hostile: refused (BAD_INPUT, or
MODEL_MISMATCH for another model's fingerprint), no session left behind, none findable by the
id it named."""

import pytest

from tests.server.fuzz.common import assert_kind_checked, slug
from tests.server.fuzz.crafted import CRAFTED_KINDS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("kind", CRAFTED_KINDS, ids=slug)
def test_crafted_import_is_refused_and_creates_nothing(campaign, kind):
    assert_kind_checked(campaign.ledger, kind)
