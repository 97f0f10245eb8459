# SPDX-License-Identifier: GPL-2.0-only
"""The session registry (cusetpm.sessions.registry) on its own: keys, victims, tombstones,
the FIFO queue with reservations, and the status snapshot."""

from __future__ import annotations

from cusetpm.kernel.structs import Space
from cusetpm.sessions.registry import EVICTED, LOST, Registry, State, is_session, key

H = 0x02000000  # HMAC session base
P = 0x03000000  # policy session base


def test_keys_ignore_the_session_type_prefix():
    assert key(P + 5) == key(H + 5) == 5
    assert is_session(H + 1) and is_session(P) and not is_session(0x80000000) and not is_session(0x40000009)
    reg = Registry()
    a = Space()
    reg.info(a, 1000)
    reg.add(P + 5, State.ATTACHED, a, 1000, 0.0)
    assert reg.get(H + 5) is reg.get(P + 5) is not None  # a saved listing finds it
    assert reg.remove(H + 5) is not None and reg.known == 0


def test_free_counts_known_and_reserved_slots():
    reg = Registry()
    assert reg.free > 1000  # unknown limit: never the reason to wait
    reg.active_max = 3
    a, b = Space(), Space()
    reg.add(P, State.ATTACHED, a, 1, 0.0)
    reg.add(P + 1, State.FOREIGN, None, -1, 0.0)
    assert reg.free == 1
    reg.enqueue(b, 0.0, 5.0)
    assert reg.grant(0.0, 1.0) and reg.reserved == 1 and reg.free == 0


def test_victims_by_tier_then_lru_never_self_never_in_use_and_only_when_idle():
    reg = Registry()
    me, other = Space(), Space()
    e_self = reg.add(P + 0, State.ATTACHED, me, 1, 0.0)
    e_old = reg.add(P + 1, State.ATTACHED, other, 1, 1.0)
    e_new = reg.add(P + 2, State.ATTACHED, other, 1, 5.0)
    e_det = reg.add(P + 3, State.DETACHED, other, 1, 6.0)
    e_fgn = reg.add(P + 4, State.FOREIGN, None, -1, 0.0)
    assert e_self.last_used == 0.0
    # At t=6.5 with 2 s idle: the detached one is too fresh; the oldest attached goes.
    assert reg.victim(me, 6.5, 2.0, False, set()) is e_old
    assert reg.victim(me, 7.5, 2.0, False, {key(e_old.handle)}) is e_new  # in use: skipped
    assert reg.victim(me, 8.0, 2.0, False, set()) is e_det  # tier 2 before tier 3
    e_det.state = State.ABANDONED
    e_det.owner = None
    assert reg.victim(me, 6.0, 2.0, False, set()) is e_det  # abandoned: at any age
    reg.remove(e_det.handle)
    reg.remove(e_old.handle)
    reg.remove(e_new.handle)
    assert reg.victim(me, 100.0, 2.0, False, set()) is None  # only its own and a foreign one
    assert reg.victim(me, 100.0, 2.0, True, set()) is e_fgn
    assert reg.next_eligible(me, 2.0, True, set()) == 2.0


def test_next_eligible_is_the_first_moment_a_candidate_may_go():
    reg = Registry()
    me, other = Space(), Space()
    reg.add(P, State.ATTACHED, other, 1, 3.0)
    reg.add(P + 1, State.ATTACHED, other, 1, 1.0)
    reg.add(P + 2, State.ATTACHED, me, 1, 0.0)
    assert reg.next_eligible(me, 2.0, False, set()) == 3.0
    assert reg.next_eligible(other, 2.0, False, set()) == 2.0
    assert reg.next_eligible(Space(), 2.0, False, {1, 0, 2}) is None


def test_tombstones_are_per_file_per_handle_and_bounded():
    reg = Registry()
    a, b = Space(), Space()
    reg.info(a)
    reg.info(b)
    for i in range(5):
        reg.tombstone(a, P + i, EVICTED, float(i), limit=3)
    assert [reg.tombstoned(a, P + i) is not None for i in range(5)] == [False, False, True, True, True]
    assert reg.tombstoned(b, P + 4) is None  # other files never see it
    assert reg.tombstoned(a, H + 4) is None  # the very handle, not another type
    reg.drop_tombstone(a, P + 4)
    assert reg.tombstoned(a, P + 4) is None
    reg.tombstone(Space(), P, LOST, 0.0, limit=3)  # a file the registry does not know: ignored
    reg.forget_space(a)
    assert reg.tombstoned(a, P + 3) is None and not reg.live(a) and reg.live(b)


def test_grant_is_fifo_and_reservations_lapse():
    reg = Registry()
    reg.active_max = 2
    spaces = [Space() for _ in range(3)]
    reg.add(P, State.ATTACHED, Space(), 1, 0.0)
    reg.add(P + 1, State.ATTACHED, Space(), 1, 0.0)
    w = [reg.enqueue(s, float(i), 10.0) for i, s in enumerate(spaces)]
    assert reg.grant(3.0, 1.0) == []
    reg.remove(P)
    assert reg.grant(3.0, 1.0) == [w[0]] and w[0].reserved_at == 3.0
    assert reg.grant(3.5, 1.0) == []  # still reserved, nothing more free
    assert reg.grant(4.5, 1.0) == [w[0]]  # lapsed, granted again to the head (still first)
    reg.dequeue(w[0])
    assert reg.grant(4.6, 1.0) == [w[1]]
    assert reg.counters["reservations_lapsed"] == 1
    reg.forget_space(spaces[1])  # a closed file's waiter goes with it
    assert reg.queue == [w[2]] and w[1].event != w[2].event


def test_uid_counts_and_client_blobs():
    reg = Registry()
    a, b = Space(), Space()
    reg.add(P, State.ATTACHED, a, 7, 0.0)
    e = reg.add(P + 1, State.DETACHED, b, 7, 0.0)
    reg.add(P + 2, State.ABANDONED, None, 7, 0.0)
    reg.add(P + 3, State.ATTACHED, b, 8, 0.0)
    assert reg.of_uid(7) == 2 and reg.of_uid(8) == 1
    e.client_blob = b"blob"
    assert reg.by_client_blob(b"blob") is e and reg.by_client_blob(b"other") is None
    assert [x.handle for x in reg.of(b, State.DETACHED)] == [P + 1]


def test_snapshot():
    reg = Registry()
    reg.active_max = 64
    a = Space()
    reg.info(a, 1000)
    reg.add(P, State.ATTACHED, a, 1000, 0.0)
    reg.add(P + 1, State.FOREIGN, None, -1, 0.0)
    reg.tombstone(a, P + 2, EVICTED, 0.0, 16)
    reg.count("evictions_attached")
    reg.count("evictions_attached")
    snap = reg.snapshot()
    assert snap["states"] == {"attached": 1, "detached": 0, "abandoned": 0, "foreign": 1}
    assert snap["free"] == 62 and snap["known"] == 2 and snap["queue"] == 0
    assert snap["counters"] == {"evictions_attached": 2}
    assert snap["files"] == [
        {"uid": 1000, "handles": {"0x03000000": "attached"}, "tombstones": {"0x03000002": "evicted"}}
    ]
