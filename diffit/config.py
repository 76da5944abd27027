"""Run settings from a flat TOML file, merged under command-line options."""
from __future__ import annotations

import os
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Keys a config file may hold, with their types.
KEYS: dict[str, type] = {
    "projdir": str, "diffs": str, "template": str, "output": str, "diffdir": str,
    "keep_diffs": bool, "level_only": bool, "no_areas": bool, "jobs": int,
    "progress": bool, "failures": str, "resume": bool, "backend": str, "scheduler": str,
    "batch_size": int,
}
#: Keys whose values are one of a few words (as on the command line).
CHOICES: dict[str, tuple[str, ...]] = {"backend": ("threads", "processes", "dask")}
#: Keys whose values are paths, resolved against the config file's folder.
PATH_KEYS = frozenset({"projdir", "diffs", "template", "output", "diffdir", "failures"})


class ConfigError(ValueError):
    """The config file is missing, not TOML, or has unknown keys or wrong types."""


def load_config(path: str | os.PathLike) -> dict:
    """Read a flat TOML config file.

    Relative paths are resolved against the file's folder.

    Parameters
    ----------
    path : path
        The ``.toml`` file.

    Returns
    -------
    dict
        Settings keyed as in :data:`KEYS`.

    Raises
    ------
    ConfigError
        With a one-line message naming the file and the problem.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"config file {name} not found") from None
    except OSError as error:
        raise ConfigError(f"config file {name} cannot be read: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {name} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(name))
    settings: dict = {}
    for key, value in data.items():
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"config file {name}: unknown key {key!r} (known: {known})")
        expected = KEYS[key]
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(
                f"config file {name}: {key} must be {expected.__name__}, not {type(value).__name__}"
            )
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config file {name}: {key} must be one of "
                              f"{', '.join(CHOICES[key])}, not {value!r}")
        if isinstance(value, str) and "\0" in value:
            raise ConfigError(f"config file {name}: {key} contains a NUL character")
        if key in PATH_KEYS:
            value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        settings[key] = value
    return settings
