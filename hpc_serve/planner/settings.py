"""Settings in layers: defaults < site file < user file (+ profile) < HPC_SERVE_* < flags.

Every resolved value remembers where it came from (`hpc-serve config show --sources`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import HpcServeError
from .options import AUTO, AUTO_OPTIONS, BY_NAME, SETTING_KINDS, defaults

#: The built-in layer: every option's default (planner/options.py).
DEFAULTS: dict[str, Any] = defaults()
FALLBACK_GPUS_PER_NODE = 8
_RESERVED_ENV = {"HPC_SERVE_SITE_CONFIG", "HPC_SERVE_CONFIG", "HPC_SERVE_PROFILE", "HPC_SERVE_DEBUG"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Resolved values and, for each key, where its value came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    profile: str | None = None
    sizing: tuple[str, ...] = ()  # the arithmetic of --tp auto (planner/sizing.py)


def site_config_path() -> str:
    return os.environ.get("HPC_SERVE_SITE_CONFIG", "/etc/hpc-serve/config.toml")


def user_config_path() -> str:
    if "HPC_SERVE_CONFIG" in os.environ:
        return os.environ["HPC_SERVE_CONFIG"]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "hpc-serve", "config.toml")


def _load_toml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except PermissionError:
        raise HpcServeError(f"Cannot read config file {path}: permission denied.",
                            "Fix its permissions, or point HPC_SERVE_CONFIG elsewhere.") from None
    except tomllib.TOMLDecodeError as exc:
        raise HpcServeError(f"Config file {path} is not valid TOML: {exc}.",
                            "Fix that line (TOML strings need quotes: partition = \"gpu\").") from None


def _check_value(key: str, value: Any, where: str) -> Any:
    kind = SETTING_KINDS[key]
    if key in AUTO_OPTIONS and value == AUTO:
        return value
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        wanted = {"int": "a whole number", "bool": "true or false", "str": "a quoted string",
                  "list": "a list of strings"}[kind]
        raise HpcServeError(f"In {where}, {key} must be {wanted} (got {value!r}).",
                            f"Write e.g. {key} = {_example(kind)}.")
    return value


def _example(kind: str) -> str:
    return {"int": "8", "bool": "true", "str": '"gpu"', "list": '["module load cuda"]'}[kind]


def _check_keys(table: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - set(SETTING_KINDS))
    if unknown:
        raise HpcServeError(f"Unknown config key {unknown[0]!r} in {where}.",
                            f"Valid keys: {', '.join(sorted(SETTING_KINDS))}.")
    return {key: _check_value(key, value, where) for key, value in table.items()}


def _file_layers(path: str, label: str, profile: str | None) -> tuple[list, set[str]]:
    """(layers, profile names) of one config file: its top level, then the chosen profile."""
    data = _load_toml(path)
    profiles = data.pop("profiles", {}) or {}
    data.pop("profile", None)
    layers = [(f"{label} {path}", _check_keys(data, str(path)))]
    if profile and profile in profiles:
        where = f"{path} [profiles.{profile}]"
        layers.append((f"{label} profile {profile!r}", _check_keys(profiles[profile], where)))
    return layers, set(profiles)


def _default_profile() -> str | None:
    for path in (user_config_path(), site_config_path()):
        name = _load_toml(path).get("profile")
        if name:
            return str(name)
    return None


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("HPC_SERVE_") or name in _RESERVED_ENV:
            continue
        key = name[len("HPC_SERVE_"):].lower()
        if key not in SETTING_KINDS:
            continue  # e.g. HPC_SERVE_HOME is read by the node side directly
        kind = SETTING_KINDS[key]
        if key in AUTO_OPTIONS and raw.strip() == AUTO:
            values[key] = AUTO
        elif kind == "int":
            if not raw.strip().isdigit():
                raise HpcServeError(f"{name}={raw!r} is not a whole number.", f"Unset it or set e.g. {name}=8.")
            values[key] = int(raw)
        elif kind == "bool":
            if raw.strip().lower() not in _TRUE | _FALSE:
                raise HpcServeError(f"{name}={raw!r} is not true or false.", f"Use {name}=1 or {name}=0.")
            values[key] = raw.strip().lower() in _TRUE
        elif kind == "list":
            values[key] = raw.splitlines() if BY_NAME[key].env_lines else shlex.split(raw)
        else:
            values[key] = raw
    return values


def resolve_settings(
    flags: dict[str, Any] | None = None,
    profile: str | None = None,
    environ: dict[str, str] | None = None,
    gpus_probe: Callable[[str | None], tuple[int, str] | None] | None = None,
) -> Settings:
    """Merge every layer. ``flags`` holds only what the user gave (None means not given).

    ``gpus_probe(partition)`` asks the cluster for GPUs per node when no layer set it.
    """
    environ = dict(os.environ) if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(flags) - set(SETTING_KINDS))
    if unknown:
        raise HpcServeError(f"Unknown option {unknown[0]!r}.",
                            f"Valid options: {', '.join(sorted(SETTING_KINDS))}.")
    profile = profile or environ.get("HPC_SERVE_PROFILE") or _default_profile()
    site_layers, site_profiles = _file_layers(site_config_path(), "site file", profile)
    user_layers, user_profiles = _file_layers(user_config_path(), "user file", profile)
    if profile and profile not in site_profiles | user_profiles:
        known = ", ".join(sorted(site_profiles | user_profiles)) or "none defined"
        raise HpcServeError(f"Unknown profile {profile!r}.",
                            f"Known profiles: {known}. Define it as [profiles.{profile}] in "
                            f"{user_config_path()}.")
    values = defaults()
    sources = {key: "default" for key in values}
    layers = [*site_layers, *user_layers, ("environment (HPC_SERVE_*)", _from_env(environ)),
              ("command line", flags)]
    for label, table in layers:
        for key, value in table.items():
            values[key], sources[key] = value, label
    if values["gpus_per_node"] is None:
        probed = gpus_probe(values["partition"]) if gpus_probe else None
        if probed:
            values["gpus_per_node"], sources["gpus_per_node"] = probed
        else:
            values["gpus_per_node"] = FALLBACK_GPUS_PER_NODE
            sources["gpus_per_node"] = "fallback (no flag, profile or sinfo answer)"
    sizing: tuple[str, ...] = ()
    if values.get("tp") == AUTO:
        from .sizing import auto_layout

        sizing = auto_layout(values, sources)
    return Settings(values, sources, profile, sizing)
