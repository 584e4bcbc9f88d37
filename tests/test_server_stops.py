"""The serve command's stop sequences (app/server/stops.py) on text that arrives piece by piece."""

from __future__ import annotations

import pytest

from mixtral_chat.app.server.stops import StopMatcher


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    sent = [matcher.add(piece) for piece in pieces]
    sent.append(matcher.flush())
    return sent, matcher.stopped


@pytest.mark.parametrize(
    ("pieces", "before"),
    [
        (["Hello", " wor", "ld", "END", " more"], "Hello world"),
        (["Hello world E", "N", "D more"], "Hello world "),  # split over three pieces
        (["EN", "D"], ""),
        (["a", "ENDEND"], "a"),
    ],
)
def test_the_text_before_a_stop_sequence_goes_out_and_nothing_after(pieces: list[str], before: str) -> None:
    sent, stopped = feed(["END"], pieces)
    assert stopped and "".join(sent) == before


def test_a_partial_match_is_held_back_then_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.add("the EN") == "the "  # "EN" may become "END"
    assert matcher.add("ding") == "ENding"
    assert matcher.add(" E") == " "
    assert matcher.flush() == "E"  # the stream ended: what was held is text after all
    assert not matcher.stopped


def test_the_earliest_of_several_stop_sequences_wins() -> None:
    sent, stopped = feed(["world", "lo w"], ["Hello world"])
    assert stopped and "".join(sent) == "Hel"


def test_without_stop_sequences_every_piece_goes_out_as_is() -> None:
    sent, stopped = feed([], ["a", "b", ""])
    assert sent == ["a", "b", "", ""] and not stopped
