"""The calculation engine's settings refuse what its Redis ACL user could never use."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from analytics_engine.calculation.service import Settings
from analytics_engine.core.acl import SERVICE_ACCESS


@pytest.mark.parametrize("key", ["ae:calc:checkpoint", "ae:calc:blue-1", "ae:calc:eu.west:a_b"])
def test_checkpoint_keys_under_the_engines_own_prefix_are_accepted(key: str) -> None:
    assert Settings(CALCULATION_CHECKPOINT_KEY=key).checkpoint_key == key


@pytest.mark.parametrize(
    "key",
    ["ae:checkpoint", "ae:db:checkpoint", "ae:calc:", "ae:calc:a*b", "ae:calc:a b", "calc:x"],
)
def test_checkpoint_keys_the_acl_user_cannot_write_are_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="CALCULATION_CHECKPOINT_KEY"):
        Settings(CALCULATION_CHECKPOINT_KEY=key)


def test_the_default_key_is_one_the_acl_user_owns() -> None:
    default = Settings().checkpoint_key
    owned = SERVICE_ACCESS["calculation_engine"].state_keys
    assert any(default.startswith(pattern.removesuffix("*")) for pattern in owned)
