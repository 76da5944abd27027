from __future__ import annotations

import pytest

from diffit.config import ConfigError, load_config


def test_paths_resolve_against_the_config_folder(tmp_path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "run.toml"
    config.write_text('projdir = "../projected"\ndiffs = "/abs/diffs.tbl"\njobs = 3\n'
                      'level_only = true\n')
    settings = load_config(config)
    assert settings == {"projdir": str(tmp_path / "projected"), "diffs": "/abs/diffs.tbl",
                        "jobs": 3, "level_only": True}


@pytest.mark.parametrize("text, message", [
    ("projdri = 'x'\n", "unknown key 'projdri'"),
    ("jobs = 'two'\n", "jobs must be int"),
    ("jobs = true\n", "jobs must be int"),
    ("level_only = 1\n", "level_only must be bool"),
    ("projdir = \n", "not valid TOML"),
    ("backend = 'loky'\n", "backend must be one of threads, processes, dask, not 'loky'"),
    ('failures = "a\\u0000b"\n', "failures contains a NUL character"),
])
def test_bad_config_is_one_clear_line(tmp_path, text, message) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(config)
    assert str(config) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")


def test_shipped_example_config_is_valid() -> None:
    from pathlib import Path

    example = Path(__file__).parent.parent / "configs" / "example.toml"
    settings = load_config(example)
    assert {"projdir", "diffs", "template", "output"} <= set(settings)
