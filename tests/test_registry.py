"""firm.registry: one lookup, one error naming the kind and the choices, for every kind of named thing."""
import pytest

from firm.config import SettingsError
from firm.data import DATASETS, SPLITS
from firm.features import TTA_MODES
from firm.losses import LOSS_MODES, LOSSES
from firm.models import BACKBONES, INITS, STEMS
from firm.registry import Registry
from firm.scoring import SCORERS
from firm.shifts import SHIFTS


def colours() -> Registry:
    return Registry("colour", {"red": 1, "green": 2}, keywords={"any": "one chosen later"}, alternative="or a hex code")


def test_entries_choices_and_lookup():
    r = colours()
    assert r.get("green") == r["green"] == 2
    assert r.names == ("red", "green") and list(r) == ["red", "green"] and len(r) == 2
    assert r.choices == ("red", "green", "any")
    assert "red" in r and "any" not in r  # a keyword is a choice, not an entry
    assert r.check("any") == ["any"] and r.check(["red", "any"]) == ["red", "any"]


def test_unknown_names_raise_one_error_naming_kind_and_choices():
    r = colours()
    with pytest.raises(SettingsError, match=r"unknown colour 'blue'; choose one of red, green, any or a hex code"):
        r.check(["red", "blue"])
    with pytest.raises(SettingsError, match=r"unknown colour 'blue'; choose one of red, green or a hex code"):
        r.get("blue")  # one entry is needed: the keywords are no choice here
    # a keyword where one entry is needed says what the keyword means and lists the entries only
    with pytest.raises(SettingsError, match=r"colour 'any' \(one chosen later\) cannot be used here.*red, green$"):
        r.get("any")


def test_a_name_is_registered_once():
    r = colours()
    r.register("blue", 3)
    assert r.get("blue") == 3 and r.choices[-2:] == ("blue", "any")
    for name in ("red", "any"):
        with pytest.raises(ValueError, match="registered already"):
            r.register(name, 4)


@pytest.mark.parametrize("registry", [LOSSES, LOSS_MODES, SCORERS, TTA_MODES, SHIFTS, BACKBONES, STEMS, INITS, DATASETS,
                                      SPLITS], ids=lambda r: r.kind)
def test_every_kind_of_named_thing_is_a_registry(registry):
    assert isinstance(registry, Registry) and len(registry) >= 2
    with pytest.raises(SettingsError, match=f"unknown {registry.kind} 'no-such-name'; choose one of "):
        registry.get("no-such-name")
