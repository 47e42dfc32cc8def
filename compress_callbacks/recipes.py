"""YAML recipes: a compression plan as a short file people share, version and review.

A recipe names callback classes and their keyword arguments (exactly the constructor's names)::

    version: 1
    callbacks:
      GradualMagnitudePruning:
        target_sparsity: 0.9
        start_step: 100
        end_step: 1000
        update_every: 50
        exclude: ["classifier", "type:torch.nn.Conv1d"]
      QuantizationAwareTraining:
        start_step: 800

``callbacks`` is a mapping (class name -> keyword arguments, run in file order) or, to use two
callbacks of one class, a list of one-key mappings (``- GradualMagnitudePruning: {...}``). Module
types in ``modules`` / ``exclude`` are written ``"type:<module path>.<class name>"``. ``log_every``
(optional, top level) is the manager's. Every key is checked against the constructor's signature,
then the technique's config dataclass validates the values; an error names the key's path
(``callbacks.GradualMagnitudePruning.end_step: ...``).

YAML is read as YAML 1.1 with three of its traps closed: ``5e-1`` and ``1e3`` are numbers (YAML 1.1
reads them as strings), an unquoted ``2:4`` (a base-60 number there) is refused with the advice to
quote it, and a key given twice in one mapping is refused (YAML would keep the last silently).

>>> from compress_callbacks import CompressionManager
>>> manager = CompressionManager.from_recipe('''
... callbacks:
...   GradualMagnitudePruning: {target_sparsity: 0.5, start_step: 0, end_step: 10}
... ''')
>>> manager.callbacks[0].target_sparsity
0.5
>>> manager.to_recipe()["callbacks"]["GradualMagnitudePruning"]["end_step"]
10
>>> callbacks_from_recipe({"callbacks": {"GradualMagnitudePruning": {"target_sparsity": 0.5, "start_step": 5, "end_step": 5}}})
Traceback (most recent call last):
...
ValueError: callbacks.GradualMagnitudePruning.end_step: `end_step` (5) must be > `start_step` (5)
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from .callback import CompressionTechnique
from .config import ArgumentError, check_int

__all__ = [
    "RECIPE_VERSION",
    "TYPE_PREFIX",
    "RecipeDumper",
    "RecipeLoader",
    "callback_class",
    "callbacks_from_recipe",
    "callbacks_to_recipe",
    "dump_recipe",
    "load_recipe",
    "read_recipe",
    "register_callback",
]

RECIPE_VERSION = 1
TYPE_PREFIX = "type:"
TOP_LEVEL_KEYS = ("version", "log_every", "callbacks")

# class name -> module defining it (imported only when a recipe names the class)
_BUILTIN_CALLBACKS = {
    "GradualMagnitudePruning": "compress_callbacks.pruning",
    "QuantizationAwareTraining": "compress_callbacks.quantization",
}
_REGISTERED: dict[str, type] = {}


# ------------------------------------------------------------------------------------ registry
def register_callback(cls: type, name: str | None = None) -> type:
    """Make a custom :class:`CompressionTechnique` usable in recipes under ``name`` (default: its class name).

    Usable as a decorator. Its ``config()`` must return the constructor's keyword arguments.

    >>> @register_callback
    ... class Noop(CompressionTechnique):
    ...     def __init__(self, every: int = 1):
    ...         super().__init__()
    ...         self.every = every
    ...     def config(self):
    ...         return {"every": self.every}
    >>> callbacks_from_recipe({"callbacks": {"Noop": {"every": 3}}})[0].every
    3
    """
    if not (isinstance(cls, type) and issubclass(cls, CompressionTechnique)):
        raise TypeError(f"`cls` must be a CompressionTechnique subclass, got {cls!r}")
    _REGISTERED[name or cls.__name__] = cls
    return cls


def callback_class(name: str) -> type:
    """The callback class a recipe calls ``name``."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN_CALLBACKS:
        return getattr(importlib.import_module(_BUILTIN_CALLBACKS[name]), name)
    known = sorted(set(_BUILTIN_CALLBACKS) | set(_REGISTERED))
    raise ValueError(f"unknown callback {name!r}; known: {', '.join(known)} (add your own with register_callback)")


# ------------------------------------------------------------------------------------ module types
def type_to_string(cls: type) -> str:
    """``nn.Linear`` -> ``"type:torch.nn.Linear"`` (the shortest already-imported path that resolves).

    >>> type_to_string(nn.Conv2d)
    'type:torch.nn.Conv2d'
    """
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and _resolve_attr(module, cls.__qualname__) is cls:
            return f"{TYPE_PREFIX}{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{TYPE_PREFIX}{cls.__module__}.{cls.__qualname__}"


def string_to_type(text: str, *, path: str = "") -> type:
    """``"type:torch.nn.Linear"`` -> ``nn.Linear`` (must name an ``nn.Module`` subclass).

    >>> string_to_type("type:torch.nn.Linear") is nn.Linear
    True
    """
    dotted = text[len(TYPE_PREFIX):]
    parts = dotted.split(".")
    found: Any = None
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = _resolve_attr(module, ".".join(parts[i:]))
        break
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ValueError(f"{path}: {text!r} does not name an nn.Module subclass (write 'type:torch.nn.Linear')")
    return found


def _resolve_attr(obj: Any, qualname: str) -> Any:
    for attr in qualname.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def _decode_types(value: Any, path: str) -> Any:
    if isinstance(value, str) and value.startswith(TYPE_PREFIX):
        return string_to_type(value, path=path)
    if isinstance(value, list):
        return [_decode_types(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _encode_types(value: Any) -> Any:
    if isinstance(value, type):
        return type_to_string(value)
    if isinstance(value, (list, tuple)):
        return [_encode_types(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ YAML
# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot or without a sign
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with ``1e3`` / ``5e-1`` read as floats, base-60 numbers (an unquoted
    ``2:4``) and duplicate keys refused.

    >>> yaml.load("lr: 5e-1\\nsteps: 1e3", Loader=RecipeLoader)
    {'lr': 0.5, 'steps': 1000.0}
    >>> yaml.load("granularity: 2:4", Loader=RecipeLoader)
    Traceback (most recent call last):
    ...
    ValueError: recipe line 1: YAML 1.1 reads the unquoted 2:4 as the base-60 number 124; write "2:4" in quotes
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    seen = key in first_line
                except TypeError:  # an unhashable key: the base class explains it
                    continue
                if seen:
                    raise ValueError(
                        f"recipe line {line}: duplicate key {key!r} (first at line {first_line[key]}); "
                        "YAML would silently keep only the last one"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)

    def _refuse_base_60(self, node: yaml.ScalarNode, number: Any) -> Any:
        text = node.value
        if ":" in text:
            raise ValueError(
                f"recipe line {node.start_mark.line + 1}: YAML 1.1 reads the unquoted {text} as the base-60 number "
                f"{number:g}; write \"{text}\" in quotes"
            )
        return number

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        return self._refuse_base_60(node, super().construct_yaml_int(node))

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        return self._refuse_base_60(node, super().construct_yaml_float(node))


class RecipeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting the strings :class:`RecipeLoader` would read as numbers (``"1e3"``).

    >>> yaml.dump({"name": "1e3", "lr": 0.5}, Dumper=RecipeDumper)
    "lr: 0.5\\nname: '1e3'\\n"
    """


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor(_FLOAT_TAG, RecipeLoader.construct_yaml_float)
for _resolver in (RecipeLoader, RecipeDumper):
    _resolver.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789."))


def dump_recipe(recipe: dict[str, Any]) -> str:
    """A recipe dict as YAML text that :func:`load_recipe` reads back unchanged.

    >>> print(dump_recipe({"version": 1, "callbacks": {"QuantizationAwareTraining": {"start_step": 10}}}), end="")
    version: 1
    callbacks:
      QuantizationAwareTraining:
        start_step: 10
    """
    return yaml.dump(recipe, Dumper=RecipeDumper, sort_keys=False)


# ------------------------------------------------------------------------------------ reading
def load_recipe(recipe: dict | str | Path) -> dict[str, Any]:
    """A recipe as a dict, from a dict, YAML text or a path to a YAML file (read with :class:`RecipeLoader`)."""
    if isinstance(recipe, dict):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and os.path.isfile(recipe)):
        with open(recipe, encoding="utf-8") as handle:
            text = handle.read()
    elif isinstance(recipe, str):
        text = recipe
    else:
        raise TypeError(f"`recipe` must be a dict, YAML text or a path, got {type(recipe).__name__}")
    try:
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"`recipe` is not valid YAML: {err}") from None
    if isinstance(data, str) or data is None:
        raise FileNotFoundError(f"`recipe`: {recipe!r} is neither an existing file nor YAML recipe text")
    if not isinstance(data, dict):
        raise TypeError(f"recipe: the top level must be a mapping with key 'callbacks', got {type(data).__name__}")
    return data


def _entries(callbacks: Any) -> list[tuple[str, str, Any]]:
    """``(path, class name, kwargs)`` for each callback of the ``callbacks`` section."""
    if isinstance(callbacks, dict):
        return [(f"callbacks.{name}", name, kwargs) for name, kwargs in callbacks.items()]
    if isinstance(callbacks, list):
        out = []
        for i, item in enumerate(callbacks):
            if not (isinstance(item, dict) and len(item) == 1):
                raise TypeError(f"callbacks[{i}]: expected a one-key mapping `ClassName: {{kwargs}}`, got {item!r}")
            ((name, kwargs),) = item.items()
            out.append((f"callbacks[{i}].{name}", name, kwargs))
        return out
    raise TypeError(f"callbacks: expected a mapping (or a list of one-key mappings), got {type(callbacks).__name__}")


def _build(path: str, name: str, kwargs: Any) -> CompressionTechnique:
    """The callback one recipe entry describes: keys checked against the constructor's signature, values
    validated by the constructor (the technique's config dataclass), errors prefixed with the key's path."""
    if not isinstance(name, str):
        raise TypeError(f"{path}: callback names must be strings, got {name!r}")
    try:
        cls = callback_class(name)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"{path}: expected a mapping of keyword arguments, got {type(kwargs).__name__}")
    parameters = {
        n: p for n, p in list(inspect.signature(cls.__init__).parameters.items())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key in kwargs:
        if key not in parameters:
            raise ValueError(f"{path}.{key}: unknown key; {name} accepts {', '.join(parameters)}")
    missing = [n for n, p in parameters.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ValueError(f"{path}: missing required key(s) {', '.join(missing)}")
    decoded = {key: _decode_types(value, f"{path}.{key}") for key, value in kwargs.items()}
    try:
        return cls(**decoded)
    except ArgumentError as err:  # the config dataclass names the argument
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"{path}.{err.argument}: {err}") from None
    except (ValueError, TypeError) as err:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"{path}: {err}") from None


def read_recipe(recipe: dict | str | Path) -> tuple[list[CompressionTechnique], dict[str, Any]]:
    """The callbacks a recipe (dict, YAML text or path) describes, in order, and its manager-level
    keyword arguments (``log_every`` when given).

    Everything is checked before anything is returned; errors name the key's path.

    >>> callbacks, options = read_recipe("log_every: 10\\ncallbacks: {QuantizationAwareTraining: {start_step: 5}}")
    >>> callbacks[0].start_step, options
    (5, {'log_every': 10})
    """
    data = load_recipe(recipe)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ValueError(f"{key}: unknown top-level key; a recipe has {', '.join(TOP_LEVEL_KEYS)}")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise ValueError(f"version: this package reads recipe version {RECIPE_VERSION}, got {version!r}")
    options = {}
    if "log_every" in data:
        try:
            options["log_every"] = check_int(data["log_every"], "log_every", minimum=0)
        except ArgumentError as err:
            raise type(err)(err.argument, f"log_every: {err}") from None
    if "callbacks" not in data:
        raise ValueError("callbacks: missing; a recipe lists its callbacks under `callbacks:`")
    return [_build(path, name, kwargs) for path, name, kwargs in _entries(data["callbacks"])], options


def callbacks_from_recipe(recipe: dict | str | Path) -> list[CompressionTechnique]:
    """Build the callbacks a recipe (dict, YAML text or path) describes, in order (see :func:`read_recipe`)."""
    return read_recipe(recipe)[0]


# ------------------------------------------------------------------------------------ writing
def callbacks_to_recipe(callbacks: list[CompressionTechnique], *, log_every: int | None = None) -> dict[str, Any]:
    """The recipe dict that rebuilds ``callbacks`` (mapping form; list form when a class repeats),
    with the manager's ``log_every`` when given."""
    entries = []
    for cb in callbacks:
        name = next((n for n, c in _REGISTERED.items() if type(cb) is c), type(cb).__name__)
        try:
            known = callback_class(name)
        except ValueError:
            known = None
        if known is not type(cb):
            raise ValueError(f"{type(cb).__name__} is not a recipe callback; register it with register_callback")
        entries.append((name, {key: _encode_types(value) for key, value in cb.config().items()}))
    names = [name for name, _ in entries]
    if len(set(names)) == len(names):
        section: Any = dict(entries)
    else:
        section = [{name: kwargs} for name, kwargs in entries]
    recipe: dict[str, Any] = {"version": RECIPE_VERSION}
    if log_every is not None:
        recipe["log_every"] = log_every
    recipe["callbacks"] = section
    return recipe
