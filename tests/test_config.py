"""Config: TOML validated into one typed object; errors name the key and what is allowed."""

from pathlib import Path

import pytest

from bot.core.config import Settings, load_settings, parse_settings
from bot.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_no_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PARLEY_CONFIG", raising=False)
    assert load_settings() == Settings()


def test_example_config_is_valid_and_equals_the_defaults():
    settings = load_settings(ROOT / "config.example.toml")
    assert settings.source.endswith("config.example.toml")
    assert settings.with_overrides(source="defaults") == Settings()


def test_values_are_read(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nquantization = "8bit"\n[generation]\ntemperature = 1\nmax_new_tokens = 32\n')
    settings = load_settings(path)
    assert settings.model.quantization == "8bit"
    assert settings.generation.temperature == 1.0 and isinstance(settings.generation.temperature, float)
    assert settings.generation.max_new_tokens == 32


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[model]\nquantisation = "4bit"', "unknown key [model] quantisation; allowed keys in [model]: backend, cache_dir"),
        ('[model]\nquantization = "3bit"', "[model] quantization = '3bit' is not allowed; use one of: 'auto', 'int8', '4bit', '8bit', 'none'"),
        ("[generation]\ntemperature = 7", "[generation] temperature = 7.0 is out of range; allowed 0.0 to 2.0"),
        ('[generation]\nmax_new_tokens = "lots"', "[generation] max_new_tokens must be an integer"),
        ("[worker]\nmax_batch = 0", "[worker] max_batch = 0 is out of range"),
        ('[console]\nenabled = "yes"', "[console] enabled must be true or false"),
        ("[discrod]\nenabled = true", "unknown section [discrod]"),
        ("model = 3", "[model] must be a table"),
        ("[model\n", "is not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_database_url_comes_from_the_named_environment_variable(monkeypatch):
    settings = parse_settings({"storage": {"url_env": "PARLEY_TEST_DB"}})
    monkeypatch.delenv("PARLEY_TEST_DB", raising=False)
    with pytest.raises(ConfigError, match="PARLEY_TEST_DB"):
        settings.database_url()
    monkeypatch.setenv("PARLEY_TEST_DB", "sqlite+aiosqlite:///x.db")
    assert settings.database_url() == "sqlite+aiosqlite:///x.db"


def test_default_database_lives_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().database_url() == f"sqlite+aiosqlite:///{tmp_path}/parley/parley.db"
