"""The one strict pydantic base of every input schema, and the one way its errors become an
:class:`~moesim.errors.InputError`.

Scenarios (pydantic dataclasses), topology files and recorded GPU runs (pydantic models)
all forbid unknown keys, so a typo never passes silently, and all report their first
problem the same way: the field as the user wrote it (``runs[3].workload.n``,
``parallel.ep``), what is wrong with it and what would be allowed.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from moesim.errors import InputError

STRICT = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
"""Config of every schema: unknown keys are errors, defaults are checked too. Dataclasses
take it as ``config=STRICT`` (and ``frozen=True, kw_only=True`` on the decorator)."""


def _bool_for_number(hint: Any, value: Any) -> bool:
    """YAML's ``true``/``false`` where a number belongs: a mistake, not 1 or 0 (which
    pydantic would take)."""
    if not isinstance(value, bool):
        return False
    args = set(typing.get_args(hint)) or {hint}
    return bool not in args and bool(args & {int, float})


def _numbers_only(fields: dict, value: Any, info: ValidationInfo) -> Any:
    if info.field_name in fields and _bool_for_number(fields[info.field_name].annotation,
                                                      value):
        raise ValueError("expected a number, not true/false")
    return value


@pydantic_dataclass(frozen=True, kw_only=True, config=STRICT)
class Checked:
    """Base of the schemas that are pydantic dataclasses (scenario sections, sweep and
    plan files): numbers stay numbers."""

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any, info: ValidationInfo) -> Any:
        return _numbers_only(cls.__pydantic_fields__, value, info)


class StrictModel(BaseModel):
    """Base of the schemas that are pydantic models (files with aliases or tagged unions)."""

    model_config = ConfigDict(**STRICT, frozen=True)

    # A model-level check: pydantic allows no field validator on a union's tag field.
    @model_validator(mode="before")
    @classmethod
    def _numbers_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                key = info.alias or name
                if key in data and _bool_for_number(info.annotation, data[key]):
                    raise ValueError(f"{key}: expected a number, not true/false")
        return data


def field_names(model: type) -> list[str]:
    """The keys a mapping of ``model`` (a pydantic model or dataclass) may hold."""
    return [info.alias or name for name, info in model.__pydantic_fields__.items()
            if not info.exclude]


def input_error(err: ValidationError, *, schema: type, source: str | None = None) -> InputError:
    """The first of ``err``'s problems as one InputError naming the field and what is
    allowed; ``schema`` is the type that was validated (to list a section's fields)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc, kind = tuple(first["loc"]), first["type"]
    ctx = first.get("ctx") or {}
    field, _ = _walk(schema, loc)
    parent = _unwrap(_walk(schema, loc[:-1])[1])
    allowed = None
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        problem = "unknown field"
        allowed = ", ".join(field_names(parent)) if _is_schema(parent) else None
    elif kind in ("missing", "missing_keyword_argument"):
        problem = "missing required field"
    elif kind == "union_tag_invalid":
        problem = f"unknown {_name(field)} kind {_shown(ctx['tag'])}"
        field += ".kind"
        allowed = ", ".join(_tags(_walk(schema, loc)[1]))
    elif kind == "union_tag_not_found":
        problem = f"missing {_name(field)} kind"
        field += ".kind"
        allowed = ", ".join(_tags(_walk(schema, loc)[1]))
    elif kind == "literal_error":
        problem = f"invalid value {_shown(first.get('input'))}"
        allowed = ctx.get("expected")
    elif kind == "too_short":
        problem = "must not be empty"
        allowed = "at least one entry"
    else:
        message = first["msg"].removeprefix("Value error, ")
        problem = f"{message[:1].lower()}{message[1:]} (got {_shown(first.get('input'))})"
        bounds, declared = _bounds(schema, loc, ctx), _type_of(schema, loc)
        if any(key in ctx for key, _ in _BOUNDS):  # a number out of its bounds
            allowed = bounds
        else:  # a value of the wrong type
            allowed = ", ".join(part for part in (declared, bounds) if part) or None
    if len(errors) > 1:
        problem += f"; {len(errors) - 1} more problem(s) after this one"
    return InputError(problem, field=field or None, allowed=allowed, source=source)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _name(field: str) -> str:
    return field.rsplit(".", 1)[-1].split("[")[0] or "entry"


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "__pydantic_fields__")


def _unwrap(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> ``X`` (other unions stay whole)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _tags(union: Any) -> list[str]:
    """The ``kind`` values of a tagged union of schemas."""
    out = []
    for member in typing.get_args(_unwrap(union)):
        info = getattr(member, "__pydantic_fields__", {}).get("kind")
        out += list(typing.get_args(info.annotation)) if info is not None else []
    return out


def _tagged(union: Any, tag: Any) -> Any:
    """The member of a tagged union of schemas whose ``kind`` literal is ``tag``."""
    for member in typing.get_args(union):
        info = getattr(member, "__pydantic_fields__", {}).get("kind")
        if info is not None and tag in typing.get_args(info.annotation):
            return member
    return None


def _walk(schema: type, loc: tuple) -> tuple[str, Any]:
    """``loc`` as the user writes the field (list indices in brackets, aliases, no union
    tags), and the type found at its end."""
    path, here = "", schema
    for part in loc:
        here = _unwrap(here)
        origin = typing.get_origin(here)
        if origin in (typing.Union, types.UnionType):
            member = _tagged(here, part)
            if member is not None:
                here = member
                continue
        if isinstance(part, int):
            path += f"[{part}]"
            here = (typing.get_args(here) or (None,))[0] if origin in (list, tuple) else None
            continue
        path += ("." if path else "") + str(part)
        if origin is dict:
            here = typing.get_args(here)[1]
        elif _is_schema(here):
            info = here.__pydantic_fields__.get(part) or next(
                (i for i in here.__pydantic_fields__.values() if i.alias == part), None)
            if info is not None and info.alias and part != info.alias:
                path = path[: -len(str(part))] + info.alias
            here = info.annotation if info is not None else None
        else:
            here = None
    return path, here


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _bounds(schema: type, loc: tuple, ctx: dict) -> str | None:
    """Every bound the field at ``loc`` declares (``> 0 and <= 1``), else the one broken."""
    info = _field_info(schema, loc)
    declared = {key: getattr(m, key) for m in (info.metadata if info else ())
                for key, _ in _BOUNDS if hasattr(m, key)}
    bounds = declared or {key: ctx[key] for key, _ in _BOUNDS if key in ctx}
    return " and ".join(f"{op} {bounds[key]}" for key, op in _BOUNDS if key in bounds) or None


def _field_info(schema: type, loc: tuple):
    """The pydantic FieldInfo of the field at ``loc`` (None past a list or dict entry)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    _, parent = _walk(schema, loc[:-1])
    parent = _unwrap(parent)
    if not _is_schema(parent):
        return None
    fields = parent.__pydantic_fields__
    return fields.get(loc[-1]) or next(
        (i for i in fields.values() if i.alias == loc[-1]), None)


def _type_of(schema: type, loc: tuple) -> str | None:
    """The declared type at ``loc``, for problems pydantic states without bounds."""
    _, here = _walk(schema, loc)
    if here is None or _is_schema(_unwrap(here)):
        return None
    return here.__name__ if isinstance(here, type) else str(here).replace("typing.", "")
