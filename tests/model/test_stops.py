from model.stops import StopMatcher


def feed_all(stops, pieces):
    matcher, out = StopMatcher(stops), []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_split_across_pieces_is_never_emitted():
    assert feed_all(["END"], ["hello E", "N", "D more"]) == ("hello ", True)


def test_partial_prefix_that_does_not_complete_is_released():
    assert feed_all(["END"], ["hello E", "NX", " bye"]) == ("hello ENX bye", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "a"], ["xxab"]) == ("xx", True)


def test_no_stops_passes_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
