"""The LoRA layout a federation shares: its hash covers how the factors are initialised."""

from __future__ import annotations

import dataclasses

import pytest

from fedvlm.shared.lora_config import INIT_SCHEMES, LoraSettings
from fedvlm.shared.tensor_codec import config_hash
from fedvlm.shared.usage_error import UsageError


def test_the_init_scheme_is_part_of_the_layout_and_its_hash():
    settings = LoraSettings(r=4, alpha=8)
    assert settings.to_dict()["init_scheme"] == INIT_SCHEMES[0]
    assert LoraSettings.from_dict(settings.to_dict()) == settings
    # A device that would draw its factors another way has another layout: refused as incompatible.
    assert config_hash({**settings.to_dict(), "init_scheme": "another"}) != settings.config_hash()
    assert dataclasses.replace(settings, init_seed=1).config_hash() != settings.config_hash()
    without_scheme = {k: v for k, v in settings.to_dict().items() if k != "init_scheme"}
    assert LoraSettings.from_dict(without_scheme).config_hash() == settings.config_hash()  # the default


def test_an_unknown_init_scheme_says_to_upgrade():
    with pytest.raises(UsageError, match="init scheme 'seeded-kaiming-v9' is unknown.*upgrade"):
        LoraSettings(init_scheme="seeded-kaiming-v9")
