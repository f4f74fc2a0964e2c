"""Serve's port: a free one picked again when another process took it first."""

import pytest

from emdpo_ray.serve.app import PORT_TRIES, PortTaken, first_bound


def binder(taken: set[int], tried: list[int]):
    def bind(p: int) -> None:
        tried.append(p)
        if p in taken:
            raise PortTaken(str(p))
    return bind


def test_port_zero_picks_again_when_the_free_port_was_taken():
    tried = []
    picks = iter([5001, 5002, 5003])
    assert first_bound(binder({5001}, tried), 0, lambda: next(picks)) == 5002
    assert tried == [5001, 5002]


def test_port_zero_gives_up_after_its_tries():
    tried = []
    picks = iter(range(6000, 6100))
    with pytest.raises(PortTaken):
        first_bound(binder(set(range(6000, 6100)), tried), 0, lambda: next(picks))
    assert tried == list(range(6000, 6000 + PORT_TRIES))


def test_a_named_port_is_tried_once_and_never_replaced():
    tried = []
    with pytest.raises(PortTaken):
        first_bound(binder({8000}, tried), 8000, lambda: 9999)
    assert tried == [8000]
    assert first_bound(binder(set(), tried), 8001, lambda: 9999) == 8001
