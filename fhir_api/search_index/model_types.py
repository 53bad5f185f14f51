"""Element types of FHIR resources, read once from the fhir.resources R4B models.

The search expressions are compiled against these types so that choice
elements (`Observation.value`) expand to their concrete JSON keys
(`valueQuantity`, ...) and each extractor knows the FHIR type of what it
returns. Ingest validates with the same R4B models and rejects unknown
elements, so an element absent here can never occur in a stored resource.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

# The primitive markers fhir.resources puts in `Annotated[...]`, by class name.
_PRIMITIVE_NAMES = {
    "Base64Binary": "base64Binary",
    "Boolean": "boolean",
    "Canonical": "canonical",
    "Code": "code",
    "Date": "date",
    "DateTime": "dateTime",
    "Decimal": "decimal",
    "Id": "id",
    "Instant": "instant",
    "Integer": "integer",
    "Integer64": "integer64",
    "Markdown": "markdown",
    "Oid": "oid",
    "PositiveInt": "positiveInt",
    "String": "string",
    "Time": "time",
    "UnsignedInt": "unsignedInt",
    "Uri": "uri",
    "Url": "url",
    "Uuid": "uuid",
    "Xhtml": "xhtml",
}

QUANTITY_TYPES = frozenset(
    {"Quantity", "Age", "Count", "Distance", "Duration", "MoneyQuantity", "SimpleQuantity"}
)


@dataclass(frozen=True, slots=True)
class ElementType:
    """One concrete JSON key of an element, with its FHIR type."""

    key: str
    type_name: str
    model: type[Any] | None
    # 0..* in the model: the element may hold several values.
    repeats: bool = False


class UnknownResourceType(LookupError):
    """The resource type has no R4B model."""


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Union/List wrappers down to the element's own annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, list) or str(origin) == "<class 'types.UnionType'>":
            args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            annotation = args[0]
            continue
        return annotation


def _type_of(annotation: Any) -> tuple[str, type[Any] | None]:
    """Return the FHIR type name and model class (None for primitives)."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        for marker in typing.get_args(annotation)[1:]:
            name = _PRIMITIVE_NAMES.get(type(marker).__name__)
            if name is not None:
                return name, None
        return "string", None
    if annotation is bool:
        return "boolean", None
    if annotation is str:
        return "string", None
    get_model = getattr(annotation, "get_model_klass", None)
    if get_model is not None:
        model: type[Any] = get_model()
        return model.__name__, model
    raise TypeError(f"unrecognised element annotation {annotation!r}")


_ELEMENTS: dict[type[Any], dict[str, tuple[ElementType, ...]]] = {}


def elements_of(model: type[Any]) -> dict[str, tuple[ElementType, ...]]:
    """Map each FHIRPath element name of a model to its concrete JSON keys and types."""
    # A plain dict, not functools.cache: typeshed does not see classes as Hashable.
    cached = _ELEMENTS.get(model)
    if cached is None:
        cached = _ELEMENTS[model] = _read_elements(model)
    return cached


def _repeats(annotation: Any) -> bool:
    """Tell whether an element annotation is a list (possibly inside Optional/Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    if origin is typing.Annotated:
        return _repeats(typing.get_args(annotation)[0])
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_repeats(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return False


def _read_elements(model: type[Any]) -> dict[str, tuple[ElementType, ...]]:
    elements: dict[str, list[ElementType]] = {}
    for field in model.model_fields.values():
        extra = field.json_schema_extra
        if not isinstance(extra, dict) or not extra.get("element_property"):
            continue
        key = field.alias or ""
        type_name, element_model = _type_of(field.annotation)
        choice = extra.get("one_of_many")
        name = choice if isinstance(choice, str) else key
        elements.setdefault(name, []).append(
            ElementType(key, type_name, element_model, _repeats(field.annotation))
        )
    return {name: tuple(types) for name, types in elements.items()}


@functools.cache
def resource_model(resource_type: str) -> type[Any]:
    """Return the R4B model class of a resource type."""
    try:
        model: type[Any] = get_fhir_model_class(resource_type)
    except (KeyError, ValueError) as error:
        raise UnknownResourceType(resource_type) from error
    # get_fhir_model_class also answers data types; only resources qualify.
    if not issubclass(model, Resource):
        raise UnknownResourceType(resource_type)
    return model


def is_subtype(type_name: str, wanted: str) -> bool:
    """Tell whether a value of `type_name` passes FHIRPath `as wanted`/`ofType(wanted)`."""
    if type_name.lower() == wanted.lower():
        return True
    # Age, Duration, ... are profiles of Quantity, so `as(Quantity)` keeps them.
    return wanted == "Quantity" and type_name in QUANTITY_TYPES
