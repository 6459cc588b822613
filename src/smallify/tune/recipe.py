"""Recipes: the steps of one candidate, each an existing verb with its config, written as JSON so that a
search's result can be replayed exactly (``smallify compress --recipe recipe.json``).

    {"kind": "smallify-recipe", "schema_version": 1, "smallify_version": "0.1.0", "seed": 0,
     "steps": [{"verb": "prune", "config": {"kind": "channel_prune", "ratio": 0.5, ...}},
               {"verb": "distill", "config": {"kind": "kd", ...}, "train": {"kind": "train", "epochs": 1, ...}},
               {"verb": "quantize", "config": {"kind": "int8_static", ...}}]}

Steps run in order on a PyTorch model (``prune``, ``decompose``, ``cluster``, ``distill``, ``quantize``); an ONNX
model takes ``quantize`` steps only. ``distill`` trains the model so far against the float model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from smallify.config import Config, config_from_dict
from smallify.errors import ConfigError

KIND = "smallify-recipe"
SCHEMA_VERSION = 1
VERBS = ("prune", "decompose", "cluster", "distill", "quantize")
ONNX_VERBS = ("quantize",)


@dataclasses.dataclass(frozen=True)
class Step:
    verb: str
    config: Config
    train: Config | None = None       # distill: the TrainConfig

    def to_dict(self) -> dict:
        d = {"verb": self.verb, "config": self.config.to_dict()}
        if self.train is not None:
            d["train"] = self.train.to_dict()
        return d

    @property
    def label(self) -> str:
        """Short and human: 'prune(0.5)', 'quantize(int8)', 'distill(1 ep)'."""
        c = self.config
        k = c.kind
        if self.verb == "prune":
            return f"prune({c.ratio:g}{f', {c.branches} branches' if c.branches else ''})"
        if self.verb == "decompose":
            return f"decompose({c.method}, macs {c.macs:g})" if c.macs else f"decompose({c.method})"
        if self.verb == "cluster":
            return f"cluster({type(c).__name__.lower()}{f' {c.bits} bit' if getattr(c, 'bits', None) else ''})"
        if self.verb == "distill":
            return f"distill({self.train.epochs:g} ep)"
        names = {"int8_static": "int8", "mixed_precision": "mixed", "float16": getattr(c, "dtype", "fp16"),
                 "weight_only": f"w{getattr(c, 'bits', '')}", "int8_dynamic": "dynamic", "fp8_static": "fp8"}
        name = names.get(k, k)
        if k == "int8_static" and c.weight_bits != 8:
            name = f"w{c.weight_bits}a8"
        if k in ("int8_static", "mixed_precision") and c.calibration != "minmax":
            name += f", {c.calibration}"
        return f"quantize({name})"


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...] = ()
    seed: int = 0

    def to_dict(self) -> dict:
        from smallify import __version__

        return {"kind": KIND, "schema_version": SCHEMA_VERSION, "smallify_version": __version__, "seed": self.seed,
                "steps": [s.to_dict() for s in self.steps]}

    @property
    def name(self) -> str:
        return " > ".join(s.label for s in self.steps) or "float"

    def key(self) -> str:
        """A stable id of what the recipe does (not of the version that wrote it)."""
        import hashlib

        d = self.to_dict()
        d.pop("smallify_version")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def then(self, *steps: Step) -> Recipe:
        return Recipe(self.steps + steps, self.seed)

    def save(self, path: str | os.PathLike) -> Path:
        from smallify.files import write_atomic

        text = json.dumps(self.to_dict(), indent=2)
        return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def step(verb: str, config: Config, train: Config | None = None) -> Step:
    if verb not in VERBS:
        raise ConfigError(f"unknown recipe step {verb!r}; accepted: {', '.join(VERBS)}")
    return Step(verb, config, train)


def recipe_from_dict(d, where: str = "recipe") -> Recipe:
    """The Recipe ``d`` describes; ConfigError (one line naming ``where``) for another kind, a newer schema or an
    unknown step or config."""
    if not isinstance(d, dict) or d.get("kind") != KIND:
        got = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"{where} is not a smallify recipe (kind {got!r}); accepted: a JSON object with kind "
                          f"{KIND!r}, as compress writes in recipe.json")
    version = d.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ConfigError(f"{where} has schema_version {version!r}, written by smallify "
                          f"{d.get('smallify_version', '?')}; this smallify reads schema_version <= {SCHEMA_VERSION}")
    steps = d.get("steps")
    if not isinstance(steps, list):
        raise ConfigError(f"{where}: 'steps' must be a list of {{'verb': ..., 'config': {{...}}}}")
    out = []
    for i, s in enumerate(steps):
        verb = s.get("verb") if isinstance(s, dict) else None
        if verb not in VERBS:
            raise ConfigError(f"{where}: step {i + 1} names unknown step {verb!r}; accepted: {', '.join(VERBS)}")
        try:
            config = config_from_dict(s.get("config"), verb)
            train = config_from_dict(s["train"], "train") if verb == "distill" else None
        except (ConfigError, TypeError, KeyError) as e:
            raise ConfigError(f"{where}: step {i + 1} ({verb}): {e}") from None
        out.append(Step(verb, config, train))
    seed = d.get("seed", 0)
    return Recipe(tuple(out), seed if isinstance(seed, int) else 0)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe file: a recipe.json, or the result.json of a search (its chosen recipe)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {p} does not exist; accepted: a recipe.json written by compress") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"recipe file {p} is not readable JSON ({type(e).__name__}); accepted: a recipe.json "
                          "written by compress") from None
    if isinstance(d, dict) and d.get("kind") == "smallify-compress-result":
        chosen = d.get("chosen") or d.get("closest")
        cands = {c.get("id"): c for c in d.get("candidates", []) if isinstance(c, dict)}
        if chosen not in cands:
            raise ConfigError(f"{p} is a compress result without a chosen candidate; accepted: a recipe.json")
        d = cands[chosen]["recipe"]
    return recipe_from_dict(d, str(p))
