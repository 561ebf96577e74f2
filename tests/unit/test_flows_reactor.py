"""ferryd.flows.reactor.Interest: epoll masks and the lazy timer heap, with explicit time."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.flows.reactor import EPOLLHUP, EPOLLIN, EPOLLOUT, Interest

INF = float("inf")


class Handle:
    """Stands for a connection: identity-hashed, like TcpConn."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reactor_fd = -1
        self.reactor_mask = 0

    def __repr__(self) -> str:
        return self.name


@pytest.fixture
def interest() -> Iterator[Interest[Handle]]:
    it: Interest[Handle] = Interest()
    yield it
    it.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_ready_reports_the_registered_events(
    interest: Interest[Handle], pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    h = Handle("a")
    interest.set_mask(h, a.fileno(), EPOLLIN)
    assert interest.ready() == []
    b.send(b"x")
    assert interest.ready() == [(h, EPOLLIN)]
    assert interest.ready() == [(h, EPOLLIN)]  # level-triggered: still there
    interest.set_mask(h, a.fileno(), EPOLLIN | EPOLLOUT)
    assert interest.ready() == [(h, EPOLLIN | EPOLLOUT)]
    assert interest.mask(h) == EPOLLIN | EPOLLOUT


def test_a_handle_of_a_closed_interest_registers_in_the_next(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The registration is kept in the handle: closing its Interest must clear it, or
    the next Interest (a rebuilt data path) would take the same mask as done."""
    a, b = pair
    h = Handle("a")
    first: Interest[Handle] = Interest()
    first.set_mask(h, a.fileno(), EPOLLIN)
    first.close()
    assert (h.reactor_fd, h.reactor_mask) == (-1, 0)
    second: Interest[Handle] = Interest()
    try:
        second.set_mask(h, a.fileno(), EPOLLIN)
        b.send(b"x")
        assert second.ready() == [(h, EPOLLIN)]
        assert second.handles() == {h}
    finally:
        second.close()


def test_an_empty_mask_unregisters_so_a_hang_up_is_not_reported(
    interest: Interest[Handle], pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    h = Handle("a")
    interest.set_mask(h, a.fileno(), EPOLLOUT)
    b.close()
    # EPOLLHUP comes whatever the mask (epoll_ctl(2)) ...
    [(got, events)] = interest.ready()
    assert got is h and events & EPOLLHUP
    # ... unless the descriptor is out of the set.
    interest.set_mask(h, a.fileno(), 0)
    assert interest.mask(h) == 0
    assert interest.ready() == []
    interest.set_mask(h, a.fileno(), EPOLLIN)
    assert [got for got, _ in interest.ready()] == [h]


def test_forget_before_close_leaves_the_reused_number_alone(interest: Interest[Handle]) -> None:
    a, peer_a = socket.socketpair()
    old, new = Handle("old"), Handle("new")
    try:
        fd = a.fileno()
        interest.set_mask(old, fd, EPOLLOUT)
        interest.forget(old)
        a.close()
        b, peer_b = socket.socketpair()  # the lowest free number: a's
        try:
            assert b.fileno() == fd
            interest.set_mask(new, fd, EPOLLOUT)
            assert interest.ready() == [(new, EPOLLOUT)]
            interest.forget(old)  # again: nothing of new's is touched
            assert interest.ready() == [(new, EPOLLOUT)]
        finally:
            b.close()
            peer_b.close()
    finally:
        peer_a.close()


def test_a_socket_closed_without_forget_cannot_take_the_new_one(
    interest: Interest[Handle],
) -> None:
    a, peer_a = socket.socketpair()
    old, new = Handle("old"), Handle("new")
    fd = a.fileno()
    interest.set_mask(old, fd, EPOLLOUT)
    a.close()  # the kernel drops the registration with the file
    b, peer_b = socket.socketpair()
    try:
        assert b.fileno() == fd
        interest.set_mask(new, fd, EPOLLOUT)
        interest.forget(old)  # late: must not unregister new's socket
        assert (new, EPOLLOUT) in interest.ready()
        assert interest.mask(new) == EPOLLOUT
    finally:
        b.close()
        peer_b.close()
        peer_a.close()


def test_unchanged_mask_makes_no_system_call(
    interest: Interest[Handle], pair: tuple[socket.socket, socket.socket]
) -> None:
    a, _ = pair
    h = Handle("a")
    fd = a.fileno()
    interest.set_mask(h, fd, EPOLLIN)
    a.close()  # any epoll_ctl on fd would now fail with EBADF
    interest.set_mask(h, fd, EPOLLIN)


def test_timers_fire_in_order(interest: Interest[Handle]) -> None:
    x, y, z = Handle("x"), Handle("y"), Handle("z")
    interest.set_deadline(x, 3.0)
    interest.set_deadline(y, 1.0)
    interest.set_deadline(z, 2.0)
    assert interest.next_deadline() == 1.0
    assert interest.due(0.5) == []
    assert interest.due(2.0) == [y, z]
    assert interest.next_deadline() == 3.0
    assert interest.due(10.0) == [x]
    assert interest.next_deadline() == INF


def test_a_later_deadline_is_not_pushed_an_earlier_one_supersedes(
    interest: Interest[Handle],
) -> None:
    h = Handle("h")
    interest.set_deadline(h, 5.0)
    interest.set_deadline(h, 9.0)  # later: the caller reschedules when 5.0 pops
    assert interest.next_deadline() == 5.0
    interest.set_deadline(h, 2.0)
    assert interest.next_deadline() == 2.0
    assert interest.due(6.0) == [h]  # once, not for the stale 5.0 entry too
    assert interest.next_deadline() == INF
    interest.set_deadline(h, INF)
    assert interest.next_deadline() == INF


def test_no_deadline_unschedules_at_once(interest: Interest[Handle]) -> None:
    # An established connection's handshake timer ends: nothing of it stays
    # scheduled until the old deadline would have popped.
    handles = [Handle(str(i)) for i in range(100)]
    for h in handles:
        interest.set_deadline(h, 5.0)
    for h in handles[1:]:
        interest.set_deadline(h, INF)
    assert interest.handles() == {handles[0]}
    assert interest.next_deadline() == 5.0
    assert interest.due(6.0) == [handles[0]]
    assert interest.next_deadline() == INF
    assert interest._heap == []  # the stale entries went with the last live one


def test_forget_drops_the_deadline(interest: Interest[Handle]) -> None:
    h, k = Handle("h"), Handle("k")
    interest.set_deadline(h, 1.0)
    interest.set_deadline(k, 2.0)
    interest.forget(h)
    assert interest.next_deadline() == 2.0
    assert interest.due(5.0) == [k]


def test_forgotten_and_scheduled_again_for_the_same_deadline_comes_once(
    interest: Interest[Handle],
) -> None:
    h = Handle("h")
    interest.set_deadline(h, 4.0)
    interest.forget(h)  # its entry stays in the heap, with the same deadline as the next
    interest.set_deadline(h, 4.0)
    assert interest.next_deadline() == 4.0
    assert interest.due(5.0) == [h]
    assert interest.next_deadline() == INF
    assert interest.due(6.0) == []


def test_dead_entries_do_not_pile_up(interest: Interest[Handle]) -> None:
    handles = [Handle(str(i)) for i in range(10)]
    now = 0.0
    for _ in range(1000):  # each round: an idle limit far off, then a short timer
        for h in handles:
            interest.set_deadline(h, now + 7200.0)
            interest.set_deadline(h, now + 1.0)
        now += 1.0
        assert sorted(interest.due(now), key=lambda h: h.name) == sorted(
            handles, key=lambda h: h.name
        )
    assert len(interest._heap) <= 2 * len(handles) + 64 + 1


def test_dead_entries_behind_a_live_one_go_without_a_new_deadline(
    interest: Interest[Handle],
) -> None:
    # A burst of handshakes ends (no deadline each) while one earlier handle
    # keeps its timer: nothing pops the dead entries behind it, and nothing
    # new is pushed, so they must go when they die.
    first = Handle("first")
    interest.set_deadline(first, 1.0)
    handles = [Handle(str(i)) for i in range(1000)]
    for h in handles:
        interest.set_deadline(h, 2.0)
    for h in handles:
        interest.set_deadline(h, INF)
    assert interest.handles() == {first}
    assert len(interest._heap) <= 2 * 1 + 64 + 1
    assert interest.next_deadline() == 1.0
    assert interest.due(3.0) == [first]


@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0, 100)), max_size=60), st.floats(0, 100))
def test_due_matches_the_earliest_deadline_asked_for(
    calls: list[tuple[int, float]], now: float
) -> None:
    interest: Interest[Handle] = Interest()
    try:
        handles = [Handle(str(i)) for i in range(5)]
        earliest: dict[Handle, float] = {}
        for index, when in calls:
            h = handles[index]
            interest.set_deadline(h, when)
            earliest[h] = min(earliest.get(h, INF), when)
        due = interest.due(now)
        assert len(due) == len(set(due))
        assert set(due) == {h for h, when in earliest.items() if when <= now}
        rest = [when for h, when in earliest.items() if when > now]
        assert interest.next_deadline() == min(rest, default=INF)
    finally:
        interest.close()


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([None, 1.0, 2.0, 3.0, 50.0])), max_size=80
    ),
    st.lists(st.sampled_from([0.5, 1.0, 2.5, 3.0, 60.0]), min_size=1, max_size=4),
)
def test_schedules_forgets_and_due_rounds_match_a_model(
    calls: list[tuple[int, float | None]], rounds: list[float]
) -> None:
    """Deadlines on few values, so that stale entries often equal live ones."""
    interest: Interest[Handle] = Interest()
    try:
        handles = [Handle(str(i)) for i in range(4)]
        model: dict[Handle, float] = {}
        step = max(1, len(calls) // len(rounds))
        for i, (index, when) in enumerate(calls):
            h = handles[index]
            if when is None:
                interest.forget(h)
                model.pop(h, None)
            else:
                interest.set_deadline(h, when)
                model[h] = min(model.get(h, INF), when)
            if i % step == step - 1:
                now = rounds[(i // step) % len(rounds)]
                due = interest.due(now)
                assert len(due) == len(set(due))
                assert set(due) == {h for h, w in model.items() if w <= now}
                for h in due:
                    del model[h]
            assert interest.next_deadline() == min(model.values(), default=INF)
    finally:
        interest.close()
