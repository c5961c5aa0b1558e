"""The command line of every toolkit script, on Hydra.

Each script's settings are one typed dataclass (its fields are the keys). :func:`parse_dataclass` registers it in
Hydra's ConfigStore as a structured config and lets Hydra compose it with the command's overrides, so every script
takes Hydra's override grammar (``key=value``, ``dict_key.sub=value``, lists ``[1, 2]``, dicts ``{a: 1}``, ``null``)
and OmegaConf checks each value against the field's type; the planning run (``come_rl.run``) composes its YAML groups
on the same Hydra. Two conveniences keep the commands written before Hydra working:

- the value of a text field is taken as it is: ``compositions=CoME pairwise, STM alpha 1`` is one string, not a
  Hydra sweep over two;
- a dict or list field also takes JSON: ``backbone_overrides={"widths": [48, 64, 96]}``.

An unknown key, a value of the wrong type and a value the config's ``__post_init__`` refuses are each a ``ValueError``
that says which key and what is valid; ``--help`` lists the keys with their type, default and documentation.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import typing
from collections.abc import Callable, Sequence
from typing import Any

from come_rl.episode_records import stop_with_resume_hint

HELP_FLAGS = ("--help", "-h")


# ---------------------------------------------------------------------------------------------------------- the keys
def field_docs(config_cls: type) -> dict[str, str]:
    """The documentation string under each field of a dataclass (and of its dataclass bases), read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError):  # no source (e.g. built in a REPL)
            continue
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _kind(hint: Any, default: Any) -> str:
    """"text" (str or Optional[str]), "container" (dict, list, tuple) or "plain" (numbers, booleans, ...)."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is str or (arguments == [str] and type(None) in typing.get_args(hint)):
        return "text"
    origin = typing.get_origin(hint) or hint
    if origin in (dict, list, tuple) or (hint is Any and isinstance(default, (dict, list, tuple))):
        return "container"
    return "plain"


def field_kinds(config_cls: type) -> dict[str, str]:
    hints = typing.get_type_hints(config_cls)
    return {field.name: _kind(hints.get(field.name, Any), _default(field)) for field in dataclasses.fields(config_cls)}


def help_text(config_cls: type, usage: str = "") -> str:
    """``--help``: the usage line, then one line per key (type, default) with its documentation."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    lines = [usage or f"keys of {config_cls.__name__} (key=value, Hydra's override grammar):"]
    for field in dataclasses.fields(config_cls):
        hint = hints.get(field.name, Any)
        type_name = str(hint).replace("typing.", "") if typing.get_args(hint) else getattr(hint, "__name__", str(hint))
        lines.append(f"  {field.name}: {type_name} = {_default(field)!r}")
        if field.name in docs:
            lines.extend("      " + line for line in textwrap.wrap(docs[field.name], 100))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ overrides
def _quoted(text: str) -> str:
    """``text`` as a Hydra single-quoted string that means exactly ``text`` (no sweep, no interpolation)."""
    text = re.sub(r"(\\+)(?='|$)", lambda match: match.group(1) * 2, text)  # backslashes before a quote are escapes
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def _literal(value: Any) -> str:
    """A JSON value as a Hydra override value."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal_key(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, str):
        return _quoted(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _literal_key(key: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w\-]*", key):
        raise ValueError(f"the dict key {key!r} is not a plain name (letters, digits, _ and -)")
    return key


def _is_quoted(raw: str) -> bool:
    return len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""


def to_overrides(argv: Sequence[str], kinds: dict[str, str], usage: str = "") -> list[tuple[str, str, str]]:
    """``key=value`` arguments -> ``(key, raw value, Hydra override)`` for a config whose keys have ``kinds``
    (:func:`field_kinds`); an unknown key or a missing ``=`` raises."""
    valid = ", ".join(kinds)
    overrides = []
    for argument in argv:
        if "=" not in argument:
            raise ValueError(f"arguments are key=value, got {argument!r}; {usage or 'valid keys: ' + valid}")
        key, raw = argument.split("=", 1)
        root = key.split(".")[0]
        if root not in kinds:
            raise ValueError(f"unknown key {key!r}; valid keys: {valid}")
        override = argument
        if "." not in key and kinds[root] == "text" and not _is_quoted(raw):
            override = f"{key}={_quoted(raw)}"
        elif "." not in key and kinds[root] == "container":
            try:
                override = f"{key}={_literal(json.loads(raw))}"
            except json.JSONDecodeError:
                pass  # Hydra's own syntax, e.g. {widths: [48, 64, 96]}
            except ValueError as error:
                raise ValueError(f"bad value for {key}: {raw!r} ({error})") from error
        overrides.append((key, raw, override))
    return overrides


# ---------------------------------------------------------------------------------------------------------- compose
def _which_override(message: str, overrides: list[tuple[str, str, str]]) -> tuple[str, str] | None:
    """The (key, raw value) that Hydra's error message is about."""
    named = re.search(r"override '?([\w.]+)|[Kk]ey[: ]+'?([\w.]+)", message)
    name = next((group for group in named.groups() if group), None) if named else None
    for key, raw, _ in overrides:
        if name in (key, key.split(".")[0]):
            return key, raw
    return (overrides[-1][0], overrides[-1][1]) if len(overrides) == 1 else None


def parse_dataclass(argv: Sequence[str], config_cls: type, usage: str = "") -> Any:
    """``key=value`` arguments -> an instance of the dataclass ``config_cls``, composed by Hydra from the structured
    config registered under the class's name; bad arguments raise a ValueError naming the key."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    kinds = field_kinds(config_cls)
    overrides = to_overrides(argv, kinds, usage)
    name = f"{config_cls.__module__}.{config_cls.__qualname__}".replace(".", "_")
    node = OmegaConf.structured(config_cls)
    for key, kind in kinds.items():
        if kind == "container" and isinstance(node._get_node(key), DictConfig):
            OmegaConf.set_struct(node[key], False)  # a dict setting takes any keys: it is the user's to fill
    ConfigStore.instance().store(name=name, node=node)
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()  # a script called from inside another Hydra app composes on its own
    try:
        with initialize(version_base=None, config_path=None):
            config = compose(config_name=name, overrides=[override for _, _, override in overrides])
        return OmegaConf.to_object(config)
    except MissingMandatoryValue as error:
        raise ValueError(f"missing {error.key}=...; {usage or 'valid keys: ' + ', '.join(kinds)}") from error
    except (HydraException, OmegaConfBaseException) as error:  # -> which key, what was wrong
        reasons = [str(error).splitlines()[0]] + ([str(error.__cause__).splitlines()[0]] if error.__cause__ else [])
        message = "; ".join(reasons)
        which = _which_override(message, overrides)
        if which is None:
            raise ValueError(f"bad arguments {list(argv)} ({message})") from error
        raise ValueError(f"bad value for {which[0]}: {which[1]!r} ({message})") from error
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def parse_cli(argv: Sequence[str], config_cls: type, usage: str = "") -> Any:
    """:func:`parse_dataclass` for a ``main``: ``--help`` prints the keys and exits; an unknown key, a bad value or a
    bad setting exits with its message."""
    if any(argument in HELP_FLAGS for argument in argv):
        print(help_text(config_cls, usage))
        raise SystemExit(0)
    try:
        return parse_dataclass(list(argv), config_cls, usage)
    except ValueError as error:
        raise SystemExit(f"{error}") from error


def run_evaluation_cli(argv: Sequence[str], config_cls: type, evaluate: Callable[[Any], list[dict]]) -> Any:
    """The shared ``main`` of the agent evaluations (find the object, return to a seen place): parse ``key=value``
    into ``config_cls``, run ``evaluate``, turn bad settings into one ``error:`` line, print each summary row."""
    config = parse_cli(argv, config_cls)
    try:
        with stop_with_resume_hint(getattr(config, "out_dir", ".")):
            summaries = evaluate(config)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    for row in summaries:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return config
