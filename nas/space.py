"""Search spaces: a YAML file of knobs over `ArchConfig`, sampled define-by-run.

A space file::

    name: paper
    budget: 1M                       # 1M parameters, or bytes at a dtype: 4MB@int8
    knobs:                           # sampled in this order
      encoder.d_model: {choice: [96, 128, 144]}
      encoder.n_heads: 4             # a fixed value
      encoder.ffn_dim: {choice: [2, 4], times: encoder.d_model}
      $blocks: {int: [2, 6]}         # a helper variable ($...), not an ArchConfig field
      encoder.n_layers: {int: [1, 3], times: $blocks}
      sharing.blocks.pattern: {choice: [cycle, cycle_rev], when: {encoder.n_layers: ...}}
      sharing.blocks.n: {ref: $blocks, when: {...}}

Knob specs: a literal (fixed), ``{choice: [...]}``, ``{int: [low, high], step: 1, log: false}``
(bounds may name an earlier knob), ``{ref: knob}`` (copy an earlier value). Modifiers:
``times: knob`` multiplies the value; ``when: {knob: value-or-list}`` samples the knob only if
every named knob has one of the listed values (otherwise the field keeps its default). Every
other key is an error naming the file and the knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

import yaml
from pydantic import TypeAdapter, ValidationError

from nas.budget import Budget, parse_budget
from nas.config import ArchConfig
from nas.errors import UserError

SPEC_KINDS = ("choice", "int", "ref")
MODIFIERS = ("times", "when", "step", "log")


@dataclass(frozen=True)
class Knob:
    name: str  # dotted ArchConfig path, or $helper
    spec: Any  # a literal, or a dict with one of SPEC_KINDS

    @property
    def fixed(self) -> bool:
        return not isinstance(self.spec, dict)


@dataclass(frozen=True)
class Space:
    name: str
    budget: Budget | None
    knobs: tuple[Knob, ...]
    source: str  # the file, for error messages

    def arch(self, pick: Callable[[Knob, dict], Any]) -> ArchConfig:
        """Realize an `ArchConfig`, asking ``pick(knob, values_so_far)`` for each free knob."""
        values: dict[str, Any] = {}
        for knob in self.knobs:
            if not _active(knob, values):
                continue
            value = knob.spec if knob.fixed else (
                values[knob.spec["ref"]] if "ref" in knob.spec else pick(knob, values))
            if not knob.fixed and "times" in knob.spec:
                value = value * values[knob.spec["times"]]
            values[knob.name] = value
        return ArchConfig.from_dict(_nest(values), source=self.source)

    def from_values(self, chosen: dict[str, Any]) -> ArchConfig:
        """The design a dict of chosen values (knob name -> sampled value) describes."""
        def pick(knob: Knob, _values: dict) -> Any:
            if knob.name not in chosen:
                raise UserError(self.source, knob.name, "no value chosen for this knob")
            return chosen[knob.name]
        return self.arch(pick)

    def sample(self, trial) -> ArchConfig:
        """Sample a design define-by-run from an Optuna trial (conditional knobs included)."""
        def pick(knob: Knob, values: dict) -> Any:
            s = knob.spec
            if "choice" in s:
                return trial.suggest_categorical(knob.name, s["choice"])
            low, high = (_bound(b, values) for b in s["int"])
            return trial.suggest_int(knob.name, low, high, step=s.get("step", 1), log=s.get("log", False))
        return self.arch(pick)

    def random(self, rng) -> ArchConfig:
        """A design drawn uniformly knob by knob (``rng``: a ``random.Random``); for tests and benchmarks."""
        def pick(knob: Knob, values: dict) -> Any:
            s = knob.spec
            if "choice" in s:
                return rng.choice(s["choice"])
            low, high = (_bound(b, values) for b in s["int"])
            return rng.randrange(low, high + 1, s.get("step", 1))
        return self.arch(pick)


def _active(knob: Knob, values: dict) -> bool:
    if knob.fixed or "when" not in knob.spec:
        return True
    for name, allowed in knob.spec["when"].items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if values.get(name, _MISSING) not in allowed:
            return False
    return True


_MISSING = object()


def _bound(b: Any, values: dict) -> int:
    return values[b] if isinstance(b, str) else b


def _nest(values: dict[str, Any]) -> dict:
    out: dict = {}
    for name, value in values.items():
        if name.startswith("$"):
            continue
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ---- loading and validating a space file ------------------------------------------------

def load_space(path: str | Path) -> Space:
    path = Path(path)
    src = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(src, "", "file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise UserError(src, where, f"YAML syntax error ({getattr(exc, 'problem', exc)})") from None
    return parse_space(doc, src, default_name=path.stem)


def parse_space(doc: Any, src: str, default_name: str = "space") -> Space:
    if not isinstance(doc, dict):
        raise UserError(src, "", "a space file is a mapping with keys name, budget, knobs")
    unknown = set(doc) - {"name", "budget", "knobs", "description"}
    if unknown:
        raise UserError(src, sorted(unknown)[0], "unknown key (expected name, budget, knobs, description)")
    budget = parse_budget(doc["budget"], src, "budget") if doc.get("budget") is not None else None
    raw = doc.get("knobs")
    if not isinstance(raw, dict) or not raw:
        raise UserError(src, "knobs", "must be a non-empty mapping of knob name to spec")
    knobs: list[Knob] = []
    seen: set[str] = set()
    for name, spec in raw.items():
        knob = _check_knob(str(name), spec, seen, src)
        knobs.append(knob)
        seen.add(knob.name)
    space = Space(str(doc.get("name") or default_name), budget, tuple(knobs), src)
    _check_paths(space)
    return space


def _check_knob(name: str, spec: Any, seen: set[str], src: str) -> Knob:
    def bad(why: str, sub: str = "") -> UserError:
        return UserError(src, f"knobs.{name}{'.' + sub if sub else ''}", why)

    if not isinstance(spec, dict):
        return Knob(name, spec)
    kinds = [k for k in SPEC_KINDS if k in spec]
    if len(kinds) != 1:
        raise bad(f"a knob spec needs exactly one of {', '.join(SPEC_KINDS)} (or a plain value)")
    for key in spec:
        if key not in SPEC_KINDS + MODIFIERS:
            raise bad("unknown key in knob spec", str(key))
    kind = kinds[0]
    if kind == "choice":
        if not isinstance(spec["choice"], list) or not spec["choice"]:
            raise bad("must be a non-empty list", "choice")
        if any(not isinstance(c, (str, int, float, bool, type(None))) for c in spec["choice"]):
            raise bad("choices must be plain values (numbers, strings, booleans, null)", "choice")
    elif kind == "int":
        r = spec["int"]
        if not isinstance(r, list) or len(r) != 2:
            raise bad("must be [low, high]", "int")
        for b in r:
            if isinstance(b, str):
                if b not in seen:
                    raise bad(f"bound {b!r} names no earlier knob", "int")
            elif not isinstance(b, int) or isinstance(b, bool):
                raise bad(f"bound {b!r} is not an integer", "int")
        if all(isinstance(b, int) for b in r) and r[0] > r[1]:
            raise bad(f"low {r[0]} is above high {r[1]}", "int")
        step = spec.get("step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise bad("must be a positive integer", "step")
        if not isinstance(spec.get("log", False), bool):
            raise bad("must be true or false", "log")
    elif spec["ref"] not in seen:
        raise bad(f"{spec['ref']!r} names no earlier knob", "ref")
    if "times" in spec and spec["times"] not in seen:
        raise bad(f"{spec['times']!r} names no earlier knob", "times")
    if "when" in spec:
        if not isinstance(spec["when"], dict) or not spec["when"]:
            raise bad("must map earlier knobs to allowed values", "when")
        for other in spec["when"]:
            if other not in seen:
                raise bad(f"{other!r} names no earlier knob", "when")
    return Knob(name, spec)


def _check_paths(space: Space) -> None:
    """Every knob that is not a $helper must name an `ArchConfig` field, and every value it can
    take (a fixed value, each choice) must have that field's type."""
    for knob in space.knobs:
        if knob.name.startswith("$"):
            continue
        node: Any = ArchConfig
        annotation: Any = None
        for part in knob.name.split("."):
            fields = getattr(node, "model_fields", None)
            if fields is None or part not in fields:
                raise UserError(space.source, f"knobs.{knob.name}", "unknown knob: no such ArchConfig field")
            annotation = fields[part].annotation
            node = _model_type(annotation)
        values = [knob.spec] if knob.fixed else knob.spec.get("choice", [])
        for value in values:
            try:
                TypeAdapter(annotation).validate_python(value)  # as ArchConfig itself validates it
            except ValidationError:
                where = f"knobs.{knob.name}" + ("" if knob.fixed else ".choice")
                raise UserError(space.source, where, f"{value!r} is not a valid value for this field "
                                f"({_type_name(annotation)})") from None


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation)))
    if annotation is type(None):
        return "null"
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _model_type(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as ``Tiling | tuple[int, ...] | None``."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in get_args(annotation):
        found = _model_type(arg)
        if found is not None:
            return found
    return None

