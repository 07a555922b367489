"""HubConfig: defaults, TOML files, flag overrides, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvlm.hub.config import DEFAULT_STATE_DIR, HubConfig, load_config, read_toml
from fedvlm.hub.errors import HubConfigError
from fedvlm.shared.lora_config import LoraSettings


def test_defaults_are_usable():
    config = HubConfig()
    assert config.strategy == "plora"
    assert config.rounds is None  # forever
    assert config.state_dir == DEFAULT_STATE_DIR
    assert config.uses_embedded_broker
    assert config.broker_url() == "mqtt://127.0.0.1:1883"
    assert config.lora == LoraSettings()


def test_toml_file_with_lora_table_and_relative_paths(tmp_path: Path):
    path = tmp_path / "conf" / "hub.toml"
    path.parent.mkdir()
    path.write_text(
        'federation = "clinic"\nstrategy = "fedex"\nrounds = 3\nmin_clients = 3\nquorum = 2\n'
        'round_timeout_s = 30\nstate_dir = "state"\nlocal_steps = 20\nlearning_rate = 5e-4\n'
        'broker = "mqtts://broker.example:8883"\nca_file = "/etc/ca.pem"\n'
        "[lora]\nr = 16\nalpha = 32\ninit_seed = 7\n"
    )
    config = load_config(path)
    assert (config.federation, config.strategy, config.rounds, config.min_clients, config.quorum) == (
        "clinic", "fedex", 3, 3, 2)  # fmt: skip
    assert config.round_timeout_s == 30
    assert config.state_dir == path.parent.resolve() / "state"  # relative to the file, not the cwd
    assert config.ca_file == "/etc/ca.pem"
    assert config.lora == LoraSettings(r=16, alpha=32, init_seed=7)
    assert (config.local_steps, config.learning_rate) == (20, 5e-4)
    assert not config.uses_embedded_broker


def test_flags_override_the_file_and_none_means_not_given(tmp_path: Path):
    path = tmp_path / "hub.toml"
    path.write_text('federation = "from-file"\nrounds = 5\n[lora]\nr = 4\nalpha = 8\n')
    config = load_config(path, {"rounds": 2, "federation": None}, {"r": 16, "alpha": None})
    assert config.federation == "from-file"
    assert config.rounds == 2
    assert (config.lora.r, config.lora.alpha) == (16, 8)


def test_unknown_keys_are_named(tmp_path: Path):
    path = tmp_path / "hub.toml"
    path.write_text("rounds = 2\nround_timout_s = 3\n")
    with pytest.raises(HubConfigError, match="round_timout_s"):
        load_config(path)
    path.write_text("[lora]\nrank = 4\n")
    with pytest.raises(HubConfigError, match="rank"):
        load_config(path)


def test_missing_and_invalid_toml_files(tmp_path: Path):
    with pytest.raises(HubConfigError, match="does not exist"):
        read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 2")
    with pytest.raises(HubConfigError, match="not valid TOML"):
        read_toml(bad)


@pytest.mark.parametrize("changes, message", [
    ({"federation": "a/b"}, "federation"),
    ({"strategy": "fedavg"}, "unknown"),
    ({"rounds": 0}, "rounds"),
    ({"min_clients": 0}, "min_clients"),
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": 0}, "fraction"),
    ({"quorum": 0}, "quorum"),
    ({"round_timeout_s": -1}, "round_timeout_s"),
    ({"round_timeout_s": float("nan")}, "round_timeout_s"),
    ({"broker": "http://x"}, "mqtt://"),
    ({"embedded_port": 70000}, "embedded_port"),
    ({"chunk_size": 10}, "chunk_size"),
    ({"mqtt_protocol": "4"}, "mqtt_protocol"),
    ({"key_file": "k.pem"}, "cert_file"),
    ({"local_steps": 0}, "local_steps"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"objective": "ppo"}, "unknown objective 'ppo'; choose one of sft, dpo"),
    ({"dpo_beta": 0}, "dpo_beta must be a positive number"),
    ({"dpo_beta": "big"}, "dpo_beta must be a positive number"),
    ({"rounds": "3"}, "integer"),
    ({"lora": {"r": 0}}, "lora"),
])  # fmt: skip
def test_invalid_values_say_which_setting(changes, message):
    with pytest.raises(HubConfigError, match=message):
        HubConfig.from_mapping(changes)


def test_password_is_not_in_the_repr():
    assert "hunter2" not in repr(HubConfig(password="hunter2"))


def test_strategy_options_from_the_file_and_flags_are_checked_against_the_layout(tmp_path: Path):
    path = tmp_path / "hub.toml"
    path.write_text('strategy = "rank-split"\n[lora]\nr = 8\n[strategy_options]\nshared_rank = 2\n')
    config = load_config(path)
    assert config.build_strategy().options() == {"shared_rank": 2}
    assert load_config(path, strategy_option_overrides={"shared_rank": 6}).build_strategy().options() == {
        "shared_rank": 6}  # fmt: skip
    # Another strategy on the command line drops the file's options (they were rank-split's).
    assert load_config(path, {"strategy": "plora"}).strategy_options == {}
    with pytest.raises(HubConfigError, match="strategy_options: rank-split option shared_rank=8 must be .* below"):
        load_config(path, strategy_option_overrides={"shared_rank": 8})
    with pytest.raises(HubConfigError, match="strategy_options: strategy 'plora' has no option 'shared_rank'"):
        HubConfig(strategy="plora", strategy_options={"shared_rank": 2})
    path.write_text('strategy_options = 3\n')
    with pytest.raises(HubConfigError, match="'strategy_options' must be a table"):
        load_config(path)
