"""Random bytes, a preface then garbage, or HTTP/1.1 on the gRPC port: the server closes each
such connection itself, while streams and half-open connections beside them stay up."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_the_server_closes_every_garbage_connection(campaign):
    tally = campaign.tcp
    assert tally.connections > 0, "the campaign opened no garbage connection"
    assert tally.left_open == [], f"{len(tally.left_open)} left open by the server"
    assert tally.closed_by_server == tally.connections


def test_idle_streams_beside_the_garbage_stay_open(campaign):
    assert campaign.idle_streams_ended == [], "the server ended streams that were only idle"
