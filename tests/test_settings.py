"""Settings in a real TOML file: defaults, round trip, clear errors, atomic writes."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mixtral_chat.app.settings import (
    CONFIG_FILENAME,
    DEFAULT_PERSONAS,
    Settings,
    SettingsError,
    dumps_toml,
    load_settings,
    save_settings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_a_missing_file_gives_the_defaults(isolated_home: Path) -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.personas == DEFAULT_PERSONAS
    assert not (isolated_home / "config" / CONFIG_FILENAME).exists()  # reading never writes


def test_round_trip_through_the_config_folder(isolated_home: Path) -> None:
    settings = Settings(model="mixtral-8x7b-instruct", theme="nord", show_cache_panel=True)
    settings.generation = replace(settings.generation, temperature=0.3, seed=7)
    settings.engine.offload = True
    settings.engine.experts_per_layer = 4
    settings.engine.gpu_budget_gb = 11.5
    settings.keymap = {"prompt.send": "ctrl+s", "chat.stop": "escape,ctrl+c"}
    settings.personas['Pirate "Pete"'] = "Talk like a pirate.\nAlways.\tÄrr — ✓"
    path = save_settings(settings)
    assert path == isolated_home / "config" / CONFIG_FILENAME
    assert load_settings() == settings
    parsed = tomllib.loads(path.read_text())
    assert parsed["keymap"]["prompt.send"] == "ctrl+s"
    assert parsed["engine"]["gpu_budget_gb"] == 11.5 and "context_length" not in parsed["engine"]  # None
    assert [p.name for p in path.parent.iterdir()] == [CONFIG_FILENAME]  # no temp file left


def test_hand_written_files_are_read_and_unknown_keys_ignored(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_text(
        '# mine\ntheme = "gruvbox"\nfuture_option = 1\n\n[generation]\ntemperature = 1\nmax_tokens = 64\n'
        '\n[personas]\nPoet = """Write\nin verse."""\n'
    )
    settings = load_settings(path)
    assert settings.theme == "gruvbox"
    assert settings.generation.temperature == 1.0 and isinstance(settings.generation.temperature, float)
    assert settings.generation.max_tokens == 64
    assert settings.personas == {"Poet": "Write\nin verse."}  # the user's table replaces the defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('theme = "dark\n', r"config\.toml: .*line 1"),
        ('[generation]\ntemperature = "hot"\n', r"generation\.temperature must be float"),
        ("[generation]\ntemperature = -1.0\n", "temperature must be between 0 and 5"),
        ("[generation]\nmax_tokens = 0\n", "max_tokens must be at least 1"),
        ("show_sidebar = 1\n", "show_sidebar must be bool"),
        ("generation = 3\n", r"\[generation\] must be a table"),
        ('[keymap]\n"prompt.send" = 1\n', r"\[keymap\] must be a table of strings"),
    ],
)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / CONFIG_FILENAME
    path.write_text(text)
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_writer_output_is_valid_toml_for_awkward_strings() -> None:
    data = {"a": 'quote " backslash \\ tab \t bell \x07 newline \n', "t": {"key with space": "x", "n": 1.5}}
    assert tomllib.loads(dumps_toml(data)) == data


def test_a_broken_config_is_never_overwritten_by_the_app(isolated_home: Path, tmp_path: Path) -> None:
    from mixtral_chat.app.chat_app import ChatApp
    from mixtral_chat.app.storage import Storage

    path = isolated_home / "config" / CONFIG_FILENAME
    path.parent.mkdir(parents=True)
    path.write_text("theme = [broken\n")
    app = ChatApp(
        Storage(), Settings(), model=str(tmp_path / "no-model"), settings_writable=False, startup_notice="bad"
    )

    async def scenario() -> None:
        async with app.run_test() as pilot:
            await pilot.pause()
            assert app.save_settings() is False
            await pilot.pause()
            assert any("not overwritten" in n.message for n in app._notifications)

    asyncio.run(scenario())
    assert path.read_text() == "theme = [broken\n"
