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

Knob specs (one pydantic model each): a literal (fixed), ``{choice: [...]}``,
``{int: [low, high], step: 1, log: false}`` (bounds may name an earlier knob), ``{ref: knob}``
(copy an earlier value). Modifiers: ``times: knob`` multiplies the value; ``when: {knob:
value-or-list}`` samples the knob only if every named knob has one of the listed values
(otherwise the field keeps its default). Every other key is an error naming the file and the knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat,
                      StrictInt, StrictStr, TypeAdapter, ValidationError, ValidationInfo, WrapValidator,
                      field_validator)

from nas.budget import Budget, parse_budget
from nas.config import ArchConfig, dotted, user_error
from nas.errors import UserError
from nas.files import read_yaml


# ---- knob specs ------------------------------------------------------------------------------
# Each kind of spec is a model; the knobs a spec may name are checked against the knobs before it,
# passed as the validation context ``{"earlier": names}``.

def _says(why: str) -> WrapValidator:
    """Report any failure of the annotated type as ``why`` (``{value!r}`` shows the value given)."""
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(why.format(value=value)) from None
    return WrapValidator(check)


def _non_empty(value: Any) -> Any:
    if not value:
        raise ValueError("empty")
    return value


def _non_empty_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list")
    return value


def _pair(value: Any) -> Any:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("must be [low, high]")
    return value


def _names_earlier(name: str | None, info: ValidationInfo) -> str | None:
    if name is not None and name not in info.context["earlier"]:
        raise ValueError(f"{name!r} names no earlier knob")
    return name


# A value Optuna can offer as a choice.
Plain = Annotated[StrictBool | StrictInt | StrictFloat | StrictStr | None,
                  _says("{value!r} is not a plain value (a number, string, boolean or null)")]
KnobName = Annotated[StrictStr, _says("{value!r} is not a knob's name")]
Bound = Annotated[StrictInt | StrictStr, _says("bound {value!r} is neither an integer nor a knob's name")]


class Spec(BaseModel):
    """What every kind of spec may add: ``times`` multiplies the value by an earlier knob's;
    ``when`` maps earlier knobs to a value or a list of values, and the knob is sampled only while
    each of them holds one of its values (``when`` is stored with a tuple of values per knob)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    times: KnobName | None = None
    when: Annotated[dict[str, Any], AfterValidator(_non_empty),
                    _says("must map earlier knobs to allowed values")] | None = None

    @field_validator("times")
    @classmethod
    def _times_names_an_earlier_knob(cls, name: str | None, info: ValidationInfo) -> str | None:
        return _names_earlier(name, info)

    @field_validator("when")
    @classmethod
    def _when_names_earlier_knobs(cls, when: dict[str, Any] | None, info: ValidationInfo) -> dict | None:
        if when is None:
            return None
        for name in when:
            _names_earlier(name, info)
        return {name: tuple(v) if isinstance(v, list) else (v,) for name, v in when.items()}


class Choice(Spec):
    """``{choice: [a, b, ...]}``: one of the listed plain values."""

    choice: Annotated[tuple[Plain, ...], BeforeValidator(_non_empty_list)]


class IntRange(Spec):
    """``{int: [low, high], step: 1, log: false}``: an integer from ``low`` to ``high`` inclusive,
    ``step`` apart (on a log scale with ``log``); a bound may name an earlier knob."""

    bounds: Annotated[tuple[Bound, Bound], BeforeValidator(_pair)] = Field(alias="int")
    step: Annotated[StrictInt, Field(ge=1), _says("must be a positive integer")] = 1
    log: Annotated[StrictBool, _says("must be true or false")] = False

    @field_validator("bounds")
    @classmethod
    def _check_bounds(cls, bounds: tuple[int | str, int | str], info: ValidationInfo) -> tuple:
        for b in bounds:
            if isinstance(b, str) and b not in info.context["earlier"]:
                raise ValueError(f"bound {b!r} names no earlier knob")
        low, high = bounds
        if isinstance(low, int) and isinstance(high, int) and low > high:
            raise ValueError(f"low {low} is above high {high}")
        return bounds

    @field_validator("log")
    @classmethod
    def _log_scale(cls, log: bool, info: ValidationInfo) -> bool:
        low = info.data.get("bounds", (1,))[0]
        if log and info.data.get("step", 1) != 1:
            raise ValueError("a log scale takes step 1")
        if log and isinstance(low, int) and low < 1:
            raise ValueError(f"a log scale needs low >= 1, not {low}")
        return log


class Ref(Spec):
    """``{ref: knob}``: an earlier knob's value."""

    ref: KnobName

    @field_validator("ref")
    @classmethod
    def _ref_names_an_earlier_knob(cls, name: str, info: ValidationInfo) -> str:
        return _names_earlier(name, info)


SPECS: dict[str, type[Spec]] = {"choice": Choice, "int": IntRange, "ref": Ref}


# ---- spaces ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Knob:
    name: str  # dotted ArchConfig path, or $helper
    spec: Any  # a plain value (fixed), or a Choice, IntRange or Ref

    @property
    def fixed(self) -> bool:
        return not isinstance(self.spec, Spec)

    def field(self, sub: str = "") -> str:
        """Where an error about this knob points: ``knobs.<name>[.<sub>]``."""
        return dotted("knobs", self.name, *([sub] if sub else []))

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the knob is sampled, given the values of the knobs before it."""
        if self.fixed or self.spec.when is None:
            return True
        return all(values.get(name, _MISSING) in allowed for name, allowed in self.spec.when.items())


_MISSING = object()


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
            if not knob.active(values):
                continue
            spec = knob.spec
            if knob.fixed:
                value = spec
            elif isinstance(spec, Ref):
                value = self._value_of(knob, spec.ref, values, "ref")
            else:
                value = pick(knob, values)
            if not knob.fixed and spec.times is not None:
                factor = self._value_of(knob, spec.times, values, "times")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, factor)):
                    raise UserError(self.source, knob.field("times"), f"cannot multiply {value!r} by "
                                    f"{spec.times}={factor!r}: both must be numbers")
                value = value * factor
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
            if isinstance(s, Choice):
                return trial.suggest_categorical(knob.name, s.choice)
            low, high = self._range(knob, values)
            return trial.suggest_int(knob.name, low, high, step=s.step, log=s.log)
        return self.arch(pick)

    def random(self, rng) -> ArchConfig:
        """A design drawn uniformly knob by knob (``rng``: a ``random.Random``); for tests and benchmarks."""
        def pick(knob: Knob, values: dict) -> Any:
            s = knob.spec
            if isinstance(s, Choice):
                return rng.choice(s.choice)
            low, high = self._range(knob, values)
            return rng.randrange(low, high + 1, s.step)
        return self.arch(pick)

    def _value_of(self, knob: Knob, name: str, values: dict[str, Any], sub: str) -> Any:
        """The value of the earlier knob ``name`` that ``knob``'s ``sub`` names."""
        if name not in values:
            raise UserError(self.source, knob.field(sub), f"{name!r} has no value here: its own when: "
                            "does not hold while this knob is sampled")
        return values[name]

    def _range(self, knob: Knob, values: dict[str, Any]) -> tuple[int, int]:
        """An int knob's bounds, with those that name earlier knobs filled in."""
        def bad(why: str) -> UserError:
            return UserError(self.source, knob.field("int"), f"{why} (bounds filled in from earlier knobs)")

        spec: IntRange = knob.spec
        low, high = (self._value_of(knob, b, values, "int") if isinstance(b, str) else b for b in spec.bounds)
        for b in (low, high):
            if not isinstance(b, int) or isinstance(b, bool):
                raise bad(f"bound {b!r} is not an integer")
        if low > high:
            raise bad(f"low {low} is above high {high}")
        if spec.log and low < 1:
            raise bad(f"a log scale needs low >= 1, not {low}")
        return low, high


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

class _SpaceFile(BaseModel):
    """A space file's top level; each knob's spec is validated on its own, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)
    name: str | None = None
    description: str | None = None
    budget: str | None = None
    knobs: Annotated[dict[Any, Any], AfterValidator(_non_empty),
                     _says("must be a non-empty mapping of knob name to spec")] = Field(
        default_factory=dict, validate_default=True)


def load_space(path: str | Path) -> Space:
    path = Path(path)
    return parse_space(read_yaml(path), str(path), default_name=path.stem)


def parse_space(doc: Any, src: str, default_name: str = "space") -> Space:
    if not isinstance(doc, dict):
        raise UserError(src, "", "a space file is a mapping with keys name, budget, knobs")
    try:
        top = _SpaceFile.model_validate(doc)
    except ValidationError as exc:
        raise user_error(src, exc) from None
    budget = parse_budget(top.budget, src, "budget") if top.budget is not None else None
    knobs: list[Knob] = []
    for name, raw in top.knobs.items():
        knobs.append(_knob(str(name), raw, {k.name for k in knobs}, src))
    space = Space(top.name or default_name, budget, tuple(knobs), src)
    _check_paths(space)
    return space


def _knob(name: str, raw: Any, earlier: set[str], src: str) -> Knob:
    """A knob from its spec in the file: a plain value is fixed, a mapping is one kind of `Spec`."""
    if not isinstance(raw, dict):
        return Knob(name, raw)
    kinds = [kind for kind in SPECS if kind in raw]
    if len(kinds) != 1:
        raise UserError(src, dotted("knobs", name),
                        f"a knob spec needs exactly one of {', '.join(SPECS)} (or a plain value)")
    try:
        return Knob(name, SPECS[kinds[0]].model_validate(raw, context={"earlier": earlier}))
    except ValidationError as exc:
        raise user_error(src, exc, prefix=dotted("knobs", name)) from None


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
                raise UserError(space.source, knob.field(), "unknown knob: no such ArchConfig field")
            annotation = fields[part].annotation
            node = _model_type(annotation)
        values = [knob.spec] if knob.fixed else knob.spec.choice if isinstance(knob.spec, Choice) else []
        for value in values:
            try:
                TypeAdapter(annotation).validate_python(value)  # as ArchConfig itself validates it
            except ValidationError:
                raise UserError(space.source, knob.field("" if knob.fixed else "choice"), f"{value!r} is not a "
                                f"valid value for this field ({_type_name(annotation)})") from None


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

