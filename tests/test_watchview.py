"""WatchView: what watchers saw, against answers that may be older than events."""

from __future__ import annotations

from gateway.watchview import WatchView


def _view(*users: str) -> WatchView:
    view = WatchView()
    for user in users:
        view.track(user)
    return view


def test_a_first_answer_is_taken_as_is() -> None:
    view = _view("alice")
    assert not view.differs("alice", True, view.mark())  # the new watcher's ack said it
    assert not view.differs("alice", True, view.mark())
    assert view.differs("alice", False, view.mark())


def test_an_answer_that_contradicts_is_a_missed_event() -> None:
    view = _view("alice")
    assert view.event("alice", True, "Alice")
    since = view.mark()
    assert view.differs("alice", False, since)
    assert view.correct("alice", False, None, since) == "Alice"  # the name from her event
    assert not view.differs("alice", False, view.mark())
    # The event itself, arriving late, repeats what watchers now see.
    assert not view.event("alice", False, "Alice")


def test_an_event_after_the_question_wins_over_the_answer() -> None:
    view = _view("alice")
    view.event("alice", True, "Alice")
    since = view.mark()
    assert view.event("alice", False, "Alice")  # she left while we asked
    # The answer (computed before she left) says online: older than the event.
    assert not view.differs("alice", True, since)
    assert view.correct("alice", True, "Alice", since) is None


def test_repeats_are_not_delivered_and_changes_are() -> None:
    view = _view("alice")
    assert view.event("alice", True, None)
    assert not view.event("alice", True, None)
    assert view.event("alice", False, None)
    # Nobody watches bob: his events are not tracked (and go nowhere).
    assert view.event("bob", True, None) and view.event("bob", True, None)


def test_forgotten_users_are_not_corrected() -> None:
    view = _view("alice")
    view.event("alice", True, None)
    since = view.mark()
    view.forget("alice")
    assert not view.differs("alice", False, since)
    assert view.correct("alice", False, None, since) is None
    assert view.users() == []


def test_a_correction_without_a_known_name_uses_the_id() -> None:
    view = _view("alice")
    view.differs("alice", True, view.mark())
    since = view.mark()
    assert view.correct("alice", False, None, since) == "alice"


def test_an_answer_asked_before_a_user_was_tracked_again_is_not_believed() -> None:
    # A periodic check asks; she comes online (delivered); her last watcher goes
    # and a new one comes (forget, track), whose ack says online. The check's
    # answer, "offline", is older than all of that.
    view = _view("alice")
    view.differs("alice", False, view.mark())
    since = view.mark()
    assert view.event("alice", True, "Alice")
    view.forget("alice")
    view.track("alice")
    assert not view.differs("alice", True, view.mark())  # the new watcher's ack
    assert view.state("alice") is True
    assert not view.differs("alice", False, since)
    assert view.correct("alice", False, None, since) is None
