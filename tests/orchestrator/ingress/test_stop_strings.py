from orchestrator.ingress.stop_strings import StopStringMatcher


def test_match_across_pushes_truncates_before_the_stop():
    m = StopStringMatcher(("END",))
    assert m.push("abc E") == "abc "  # 'E' may start END: held back
    assert m.push("N") == ""
    assert m.push("Dxyz") == "" and m.stopped
    assert m.push("more") == "" and m.flush() == ""


def test_held_text_released_when_not_a_stop():
    m = StopStringMatcher(("END",))
    assert m.push("abEN") == "ab"
    assert m.push("x") == "ENx" and not m.stopped
    assert m.push("E") == "" and m.flush() == "E"


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(("cd", "b"))
    assert m.push("abcd") == "a" and m.stopped


def test_no_stops_passes_text_through():
    m = StopStringMatcher(())
    assert m.push("abc") == "abc" and m.flush() == "" and not m.stopped
