# SPDX-License-Identifier: GPL-2.0-only
"""cusetpm.tenants.rate: the token bucket holds a tenant to its rate and never refuses."""

from __future__ import annotations

import pytest

from cusetpm.tenants.rate import TokenBucket


def test_a_burst_of_one_second_goes_at_once_then_commands_are_spaced() -> None:
    b = TokenBucket(10)
    assert [b.delay(0.0) for _ in range(10)] == [0.0] * 10
    waits = [b.delay(0.0) for _ in range(5)]
    assert waits == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # reserved in arrival order


def test_the_average_rate_holds_over_time() -> None:
    b, now, sent = TokenBucket(50), 0.0, 0
    while now < 10.0:
        now += b.delay(now)
        sent += 1
    assert 50 * 10 <= sent <= 50 * 11 + 1  # ten seconds at 50/s, plus the first second's burst


def test_an_idle_bucket_refills_only_to_its_burst() -> None:
    b = TokenBucket(2)
    b.delay(0.0), b.delay(0.0)
    assert b.delay(100.0) == 0.0 and b.delay(100.0) == 0.0
    assert b.delay(100.0) == pytest.approx(0.5)


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_take_now_takes_a_token_only_when_the_command_need_not_wait() -> None:
    b = TokenBucket(10, burst=2)
    assert b.take_now(0.0) and b.take_now(0.0)
    assert not b.take_now(0.0) and not b.take_now(0.05)  # nothing taken: half a token by then
    assert b.take_now(0.1)  # a whole one
    assert b.delay(0.1) == pytest.approx(0.1)  # the next waits its turn, as before
    assert not b.take_now(0.15)  # a reserved wait is not jumped
    assert b.take_now(0.31)  # its turn (0.2) has passed, and a token since
