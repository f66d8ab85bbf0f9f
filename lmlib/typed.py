"""Typed parameter fields (pydantic v2) shared by every typed model of the project: the field types (a count is
never a bool, a number never NaN), :func:`field` (a default, a one-line description with units, and what is allowed
in words for the one-line error), the one-line error itself and a model as a Markdown table for the documentation.

The models: :class:`lmlib.data.dataset_spec.DatasetDeclaration` (a declaration file's keys),
:class:`lmlib.methods.config.MethodParameters` (each method's parameters),
:class:`lmlib.engine.parameters.SharedParameters` (the run parameters every method shares).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from pydantic_core import PydanticUndefined


def _not_bool(value: Any) -> Any:
    """A bool is not a count or a rate here (``max_epochs=True`` would read as 1)."""
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


def one_of(choices: tuple[str, ...]) -> AfterValidator:
    """A validator accepting only ``choices`` (the field's type stays ``str``)."""
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"not one of {choices}")
        return value
    return AfterValidator(check)


def _grid(value: list[int] | None) -> list[int] | None:
    if value and len(value) not in (2, 3):
        raise ValueError("a grid has 2 or 3 sizes")
    return value


def _as_text(value: Any) -> Any:
    """A path or a torch device given where a name is expected is taken by its text."""
    return value if value is None or isinstance(value, str) else str(value)


Text = Annotated[str, BeforeValidator(_as_text)]
Int = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Grid = Annotated[list[Annotated[Int, Field(ge=1)]] | None, AfterValidator(_grid)]
#: integers >= 1, one per level (a field gives the length: ``field(..., min_length=5, max_length=5)``)
Levels = list[Annotated[Int, Field(ge=1)]]
#: network widths: at least one level
Widths = Annotated[Levels, Field(min_length=1)]


def field(default: Any, description: str, allowed: str | None = None, **bounds: Any) -> Any:
    """A field with its description and, for the one-line error, what is allowed (``must be <allowed>``)."""
    return Field(default, description=description, json_schema_extra={"allowed": allowed} if allowed else None,
                 **bounds)


def allowed_text(model: type[BaseModel], name: str) -> str | None:
    """What a field accepts, in words (the tail of its one-line error); None for free text."""
    extra = model.model_fields[name].json_schema_extra
    return str(extra["allowed"]) if isinstance(extra, dict) and extra.get("allowed") else None


def one_line_error(model: type[BaseModel], exc: ValidationError, values: Mapping[str, Any]) -> ValueError:
    """``name=value: must be <allowed>`` for the first refused field in the model's order."""
    order = list(model.model_fields)
    names = [str(e["loc"][0]) for e in exc.errors() if e["loc"] and str(e["loc"][0]) in order]
    if not names:  # an unknown name (extra="forbid")
        unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        return ValueError(f"{model.__name__}: unknown parameters {unknown} (known: {order})")
    name = min(names, key=order.index)
    return ValueError(f"{name}={values[name]!r}: must be {allowed_text(model, name) or 'a valid value'}")


def model_table(model: type[BaseModel], default_text: Mapping[str, str] | None = None, none_text: str = "`None`",
                header: str = "parameter") -> str:
    """A model's fields as a Markdown table (``header``, default, what it accepts, meaning), for the documentation;
    ``default_text`` replaces the shown default of some fields, ``none_text`` a default of None; a required field
    shows ``required``."""
    special = dict(default_text or {})
    rows = [f"| {header} | default | accepts | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        value = f.default.model_dump() if isinstance(f.default, BaseModel) else f.default
        default = special.get(name, "required" if f.default is PydanticUndefined else none_text if value is None
                              else f"`{value!r}`")
        rows.append(f"| `{name}` | {default} | {allowed_text(model, name) or 'text'} | "
                    f"{(f.description or '').replace('|', '/')} |")
    return "\n".join(rows)
