import pytest

from qkcov.models.heads import check_heads, check_layers, format_head, parse_heads


def test_parse_heads_ok():
    assert parse_heads("L20H26,L16H19", 32, 32) == [(20, 26), (16, 19)]
    assert parse_heads(" l1h2 , L1H2", 4, 4) == [(1, 2)]
    assert parse_heads(["L0H0", "L3H3"], 4, 4) == [(0, 0), (3, 3)]
    assert format_head(20, 26) == "L20H26"


@pytest.mark.parametrize("spec", ["L20", "H3", "L1H", "20:26", "L1H2;L3H4", ""])
def test_parse_heads_bad_syntax(spec):
    with pytest.raises(ValueError, match="spec"):
        parse_heads(spec, 30, 9)


@pytest.mark.parametrize("spec", ["L30H0", "L0H9", "L99H99"])
def test_parse_heads_out_of_range(spec):
    with pytest.raises(ValueError, match=r"\[0, 29\].*\[0, 8\]"):
        parse_heads(spec, 30, 9)


def test_check_layers_heads():
    assert check_layers([3, -1, 3], 4) == [3]
    assert check_heads(None, 3) == [0, 1, 2]
    assert check_heads([2, 0, 2], 3) == [2, 0]
    with pytest.raises(ValueError, match=r"layer 4 out of range; valid layers are \[0, 3\]"):
        check_layers(4, 4)
    with pytest.raises(ValueError, match=r"head 3 out of range"):
        check_heads([3], 3)
    with pytest.raises(ValueError, match="no layers"):
        check_layers([], 4)
