"""The base of each method's typed parameter model (pydantic v2; the field types: :mod:`lmlib.typed`).

A method declares its notebook parameters as a :class:`MethodParameters` subclass (``Parameters``): each field
with its type, bounds, default and a one-line description stating units. The model is the one place a method
parameter's default lives: ``from_parameters`` fills absent names from it, the method's constructor takes its
defaults from it (:func:`defaults`), and ``tests/test_notebook_structure.py`` holds every notebook's parameters
cell and every driver profile to it.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lmlib.typed import field, one_line_error


class MethodParameters(BaseModel):
    """Base of a method's parameter model: unknown names are refused (a misspelt profile key fails)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def values(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every field: ``params``' value where given (validated), else the model's default. Names of ``params``
        that are not fields are ignored (the shared ones); a refused value raises one ``ValueError`` line."""
        given = {k: v for k, v in params.items() if k in cls.model_fields}
        try:
            return cls.model_validate(given).model_dump()
        except ValidationError as exc:
            raise one_line_error(cls, exc, given) from None


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Each field's default (for a constructor's signature: one source of truth)."""
    return {name: f.default for name, f in model.model_fields.items()}


def base_run_field() -> Any:
    """The ``base_run`` parameter of a method that starts from a finished run (refinement, test-time scales, the
    shape prior): one description for all of them."""
    return field("", "the base run's folder; empty: base_method's folder beside output_dir", "a folder path or empty")


def base_run_folder(base_run: str, base_method: str, output_dir: str | Path) -> Path:
    """The finished run a derived method reads (refinement, test-time scales): ``base_run`` when given, else the
    folder ``base_method`` beside ``output_dir``."""
    return Path(base_run) if base_run else Path(output_dir).parent / base_method
