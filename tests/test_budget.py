"""autoselect_fast.budget: K per image from keep / keep_ratio, and the checks of that pair."""
import pytest

from autoselect_fast.budget import check_budget_args, image_budget


def test_image_budget():
    assert image_budget(576, keep=64) == 64
    assert image_budget(576, keep_ratio=0.25) == 144
    assert image_budget(3, keep_ratio=0.1) == 1  # never below one token
    assert image_budget(576) == 576  # neither given: every token
    assert image_budget(40, keep=64, clip=True) == 40
    with pytest.raises(ValueError) as info:
        image_budget(40, keep=64, where="request 2")
    assert str(info.value) == "keep=64 exceeds the 40 visual tokens of request 2; allowed: 1 <= keep <= 40"


@pytest.mark.parametrize(
    "keep, keep_ratio, required, words",
    [
        (None, None, True, "give exactly one of keep"),
        (4, 0.5, False, "give keep or keep_ratio, not both"),
        (0, None, False, "keep must be an int >= 1 (or None to keep every token), got 0"),
        (True, None, True, "keep must be an int >= 1, got True"),
        (None, 1.5, True, "keep_ratio must be a float in (0, 1], got 1.5"),
    ],
)
def test_check_budget_args(keep, keep_ratio, required, words):
    with pytest.raises(ValueError) as info:
        check_budget_args(keep, keep_ratio, required=required)
    assert words in str(info.value)
    check_budget_args(4, None, required=True)  # a good pair passes
