"""A client that writes 1,000 full-size messages before reading any response: once it reads,
every response is there, in order, equal to the offline model, and the stream ends OK."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_client_that_reads_late_gets_every_response(campaign):
    assert not campaign.broken, campaign.broken
    reader = campaign.slow_reader
    assert reader.responses == reader.messages
    assert reader.end == "OK"
    assert reader.difference <= 1e-5, f"outputs differ from offline by {reader.difference}"
