"""The demo's comparisons read one way only (an error 37% lower is never printed as "+37%")."""
from tdiff.demo import compare_lower_is_better


def test_comparisons_name_their_direction():
    assert compare_lower_is_better(0.063, 0.1) == "37% lower (better)"
    assert compare_lower_is_better(0.137, 0.1) == "37% higher (worse)"
    assert compare_lower_is_better(0.1, 0.1) == "equal"
