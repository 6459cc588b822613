"""Base of every method config: validation in ``__post_init__``, to/from dict with a schema version."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from smallify.errors import ConfigError

SCHEMA_VERSION = 1


def check_choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not supported; accepted: {', '.join(map(repr, accepted))}")


def check_config(config: Any, accepted: type | tuple[type, ...], verb: str, argument: str = "config") -> Any:
    """Every verb's check of what it is handed: ``config`` unchanged when it is one of ``accepted`` (or None:
    the verb's default), else a ConfigError naming the accepted types and, for a config of another verb, where
    it belongs."""
    accepted = accepted if isinstance(accepted, tuple) else (accepted,)
    if config is None or isinstance(config, accepted):
        return config
    names = ", ".join(c.__name__ for c in accepted)
    got = type(config).__name__
    hint = f" ({got} configures {', '.join(config.verbs)})" if isinstance(config, Config) and config.verbs else ""
    raise ConfigError(f"{verb}() takes {argument} of type {names}; got {got}{hint}")


REGISTRY: dict[str, type["Config"]] = {}     # kind -> config class; every Config subclass that names a kind


def configs_of(verb: str) -> tuple[type["Config"], ...]:
    """The registered config classes that ``verb`` takes (``verb`` in their ``verbs``), sorted by class name:
    what a verb accepts is declared by the config classes, never listed again in the verb."""
    return tuple(sorted((c for c in REGISTRY.values() if verb in c.verbs), key=lambda c: c.__name__))


def config_from_dict(d: dict[str, Any], verb: str | None = None) -> "Config":
    """The config that ``d`` describes (as ``to_dict`` wrote it), its class found by ``kind`` in the registry;
    ``verb``: accept only the configs of that verb (e.g. 'quantize')."""
    kinds = {c.kind: c for c in (REGISTRY.values() if verb is None else configs_of(verb))}
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in kinds:
        raise ConfigError(f"unknown config kind {kind!r}; accepted: {sorted(kinds)}")
    return kinds[kind].from_dict(d)


@dataclasses.dataclass
class Config:
    """A method's settings. Subclasses are dataclasses; ``kind`` names them in files."""

    kind: ClassVar[str] = "config"
    verbs: ClassVar[tuple[str, ...]] = ()     # the smallify verbs that take it, for messages

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        d = dict(d)
        kind, version = d.pop("kind", cls.kind), d.pop("schema_version", SCHEMA_VERSION)
        if kind != cls.kind:
            raise ConfigError(f"config kind {kind!r} given to {cls.__name__}, which reads kind {cls.kind!r}")
        if version > SCHEMA_VERSION:
            raise ConfigError(f"config schema_version {version} is newer than this smallify reads ({SCHEMA_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; accepted: {sorted(names)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
                      for k, v in d.items()})
