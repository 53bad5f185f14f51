"""Compile parsed FHIRPath search expressions into typed Python getters.

An expression becomes a list of `Branch`es: one per concrete FHIR type it can
yield (a choice element such as `Observation.value` gives one branch per
`value[x]` type, each reading one fixed JSON key). A branch's `get` maps the
focus item (the resource, or a composite's element) to the raw JSON values, so
extraction at ingest is plain dict and list walking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_api.search_index import fhirpath
from fhir_api.search_index.encoding import reference_type
from fhir_api.search_index.fhirpath import (
    Binary,
    Call,
    Index,
    Literal,
    Member,
    Node,
    TypeOperation,
    Union,
    Variable,
)
from fhir_api.search_index.model_types import ElementType, elements_of, is_subtype

Getter = Callable[[Any], list[Any]]
Predicate = Callable[[Any], bool | None]

_STRING_TYPES = frozenset(
    {"string", "code", "id", "uri", "url", "canonical", "oid", "uuid", "markdown"}
)
_NUMBER_TYPES = frozenset({"integer", "decimal", "positiveInt", "unsignedInt", "integer64"})


class CompileError(ValueError):
    """The expression uses something the compiler does not support."""


class UnknownElement(CompileError):
    """The expression names an element the R4B model of its focus does not have."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What the focus of an expression is: its type, and the resource it sits in."""

    type_name: str
    model: type[Any] | None
    resource_type: str
    is_root: bool


@dataclass(frozen=True, slots=True)
class Branch:
    """A getter yielding values of one FHIR type from the focus (or the root, if rooted)."""

    type_name: str
    model: type[Any] | None
    get: Getter
    keys: tuple[str, ...] | None = None
    rooted: bool = False
    # The focus key every value is read under (None: unknown or the focus itself),
    # so extraction can skip branches whose first element is absent.
    first_key: str | None = None
    # The element names read from the focus when none of them repeats (the
    # branch yields at most one value); None when it may yield several.
    single_path: tuple[str, ...] | None = None


def _identity(node: Any) -> list[Any]:
    return [node]


def path_getter(keys: tuple[str, ...]) -> Getter:
    """Return a getter following JSON keys, flattening lists at every step."""
    if len(keys) == 1:
        (key,) = keys

        def get_one(node: Any) -> list[Any]:
            value = node.get(key) if isinstance(node, dict) else None
            if value is None:
                return []
            return value if isinstance(value, list) else [value]

        return get_one

    def get_many(node: Any) -> list[Any]:
        items = [node]
        for key in keys:
            found: list[Any] = []
            for item in items:
                if not isinstance(item, dict):
                    continue
                value = item.get(key)
                if value is None:
                    continue
                if isinstance(value, list):
                    found.extend(value)
                else:
                    found.append(value)
            if not found:
                return found
            items = found
        return items

    return get_many


def _then(first: Getter, then: Getter) -> Getter:
    """Return a getter applying `then` to every item `first` yields."""

    def get(node: Any) -> list[Any]:
        found: list[Any] = []
        for item in first(node):
            found.extend(then(item))
        return found

    return get


def _member(branch: Branch, element: ElementType, name: str) -> Branch:
    """Return the branch reading one element (`name`, one of its choice keys) of `branch`."""
    single = (
        (*branch.single_path, name)
        if branch.single_path is not None and not element.repeats
        else None
    )
    if branch.keys is not None:
        keys = (*branch.keys, element.key)
        first = branch.first_key or keys[0]
        getter = path_getter(keys)
        return Branch(element.type_name, element.model, getter, keys, branch.rooted, first, single)
    getter = _then(branch.get, path_getter((element.key,)))
    return Branch(
        element.type_name, element.model, getter, None, branch.rooted, branch.first_key, single
    )


def _filtered(branch: Branch, predicate: Predicate) -> Branch:
    """Return the branch keeping only the items for which `predicate` is true."""
    inner = branch.get

    def get(node: Any) -> list[Any]:
        return [item for item in inner(node) if predicate(item) is True]

    # A filter keeps at most what it is given.
    return Branch(
        branch.type_name,
        branch.model,
        get,
        None,
        branch.rooted,
        branch.first_key,
        branch.single_path,
    )


def _focus(scope: Scope) -> Branch:
    return Branch(scope.type_name, scope.model, _identity, (), False, single_path=())


def _members(bases: list[Branch], name: str) -> list[Branch]:
    """Return the branches for `.name` on each base branch."""
    result: list[Branch] = []
    for base in bases:
        if base.model is None:
            raise CompileError(f"cannot read {name!r} of primitive {base.type_name}")
        for element in elements_of(base.model).get(name, ()):
            result.append(_member(base, element, name))
    if bases and not result:
        names = "/".join(sorted({base.type_name for base in bases}))
        raise UnknownElement(f"{names} has no element {name!r}")
    return result


def compile_node(node: Node, scope: Scope) -> list[Branch]:
    """Compile an expression into the branches it yields on the given focus."""
    if isinstance(node, Member):
        if node.base is None and node.name[:1].isupper():
            # A leading type name filters: `Observation.code` is empty on a Patient.
            matches = node.name in (scope.resource_type, "Resource", "DomainResource")
            if not scope.is_root:
                raise CompileError(f"type name {node.name!r} inside a sub-expression")
            return [_focus(scope)] if matches else []
        bases = [_focus(scope)] if node.base is None else compile_node(node.base, scope)
        return _members(bases, node.name)
    if isinstance(node, Union):
        return compile_node(node.left, scope) + compile_node(node.right, scope)
    if isinstance(node, TypeOperation) and node.operator == "as":
        return _as_type(compile_node(node.base, scope), node.type_name)
    if isinstance(node, Index):
        bases = compile_node(node.base, scope)
        if len(bases) > 1:
            raise CompileError("an indexer over several types")
        return [_indexed(base, node.position) for base in bases]
    if isinstance(node, Variable):
        if node.name not in ("resource", "rootResource"):
            raise CompileError(f"unsupported variable %{node.name}")
        model = get_fhir_model_class(scope.resource_type)
        return [Branch(scope.resource_type, model, _identity, (), True)]
    if isinstance(node, Call):
        return _call(node, scope)
    if isinstance(node, Binary | TypeOperation):
        predicate = compile_boolean(node, scope)
        return [_boolean_branch(predicate)]
    raise CompileError(f"unsupported expression {node!r}")


def _call(node: Call, scope: Scope) -> list[Branch]:
    bases = [_focus(scope)] if node.base is None else compile_node(node.base, scope)
    if node.name in ("as", "ofType"):
        (type_literal,) = node.args
        if not isinstance(type_literal, Literal) or not isinstance(type_literal.value, str):
            raise CompileError(f"{node.name}() takes a type name")
        return _as_type(bases, type_literal.value)
    if node.name == "where":
        (condition,) = node.args
        result: list[Branch] = []
        for base in bases:
            inner = Scope(base.type_name, base.model, scope.resource_type, False)
            result.append(_filtered(base, compile_boolean(condition, inner)))
        return result
    if node.name == "extension":
        (url_literal,) = node.args
        if not isinstance(url_literal, Literal) or not isinstance(url_literal.value, str):
            raise CompileError("extension() takes a string literal")
        url = url_literal.value
        return [
            _filtered(branch, lambda item: isinstance(item, dict) and item.get("url") == url)
            for branch in _members(bases, "extension")
        ]
    if node.name == "exists" and not node.args:
        return [_boolean_branch(compile_boolean(node, scope))]
    raise CompileError(f"unsupported function {node.name}()")


def _as_type(bases: list[Branch], type_name: str) -> list[Branch]:
    """Keep the branches whose type passes `as type_name`."""
    kept = [base for base in bases if is_subtype(base.type_name, type_name)]
    if bases and not kept:
        names = "/".join(sorted({base.type_name for base in bases}))
        raise UnknownElement(f"no {type_name} among {names}")
    return kept


def _indexed(base: Branch, position: int) -> Branch:
    inner = base.get

    def get(node: Any) -> list[Any]:
        items = inner(node)
        return items[position : position + 1]

    return Branch(base.type_name, base.model, get, None, base.rooted, base.first_key)


def _boolean_branch(predicate: Predicate) -> Branch:
    def get(node: Any) -> list[Any]:
        result = predicate(node)
        return [] if result is None else [result]

    return Branch("boolean", None, get)


def _typed_values(branches: list[Branch], node: Any) -> list[tuple[str, Any]]:
    return [(branch.type_name, value) for branch in branches for value in branch.get(node)]


def _category(type_name: str) -> str:
    if type_name in _STRING_TYPES:
        return "string"
    if type_name in _NUMBER_TYPES:
        return "number"
    return type_name


def _equal(left: list[tuple[str, Any]], right: list[tuple[str, Any]]) -> bool | None:
    """FHIRPath `=`: empty if either side is empty, else item-wise equality."""
    if not left or not right:
        return None
    if len(left) != len(right):
        return False
    return all(
        _category(left_type) == _category(right_type) and left_value == right_value
        for (left_type, left_value), (right_type, right_value) in zip(left, right, strict=True)
    )


def _literal_branch(literal: Literal) -> Branch:
    value = literal.value
    type_name = (
        "boolean" if isinstance(value, bool) else "integer" if isinstance(value, int) else "string"
    )
    return Branch(type_name, None, lambda _node: [value])


def _operand(node: Node, scope: Scope) -> list[Branch]:
    return [_literal_branch(node)] if isinstance(node, Literal) else compile_node(node, scope)


def compile_boolean(node: Node, scope: Scope) -> Predicate:
    """Compile a condition into a three-valued predicate (None = empty)."""
    if isinstance(node, Literal) and isinstance(node.value, bool):
        constant = node.value
        return lambda _node: constant
    if isinstance(node, TypeOperation) and node.operator == "is":
        return _resolve_is(node, scope)
    if isinstance(node, Call) and node.name == "exists" and not node.args:
        bases = [_focus(scope)] if node.base is None else compile_node(node.base, scope)
        return lambda item: any(base.get(item) for base in bases)
    if isinstance(node, Binary) and node.operator in ("=", "!="):
        fast = _simple_comparison(node, scope)
        if fast is not None:
            return fast
        left = _operand(node.left, scope)
        right = _operand(node.right, scope)
        negate = node.operator == "!="

        def compare(item: Any) -> bool | None:
            result = _equal(_typed_values(left, item), _typed_values(right, item))
            return None if result is None else result is not negate

        return compare
    if isinstance(node, Binary) and node.operator in ("and", "or"):
        first = compile_boolean(node.left, scope)
        second = compile_boolean(node.right, scope)
        return _and(first, second) if node.operator == "and" else _or(first, second)
    raise CompileError(f"unsupported condition {node!r}")


def _simple_comparison(node: Binary, scope: Scope) -> Predicate | None:
    """Compile `element = 'text'` on a single primitive element into one dict lookup."""
    if not isinstance(node.right, Literal) or not isinstance(node.right.value, str):
        return None
    if not isinstance(node.left, Member) or node.left.base is not None:
        return None
    branches = compile_node(node.left, scope)
    if len(branches) != 1:
        return None
    (branch,) = branches
    if branch.keys is None or len(branch.keys) != 1:
        return None
    if branch.type_name not in _STRING_TYPES:
        return None
    key, literal, negate = branch.keys[0], node.right.value, node.operator == "!="

    def compare(item: Any) -> bool | None:
        value = item.get(key) if isinstance(item, dict) else None
        if not isinstance(value, str):
            return None
        return (value == literal) is not negate

    return compare


def _and(first: Predicate, second: Predicate) -> Predicate:
    def evaluate(item: Any) -> bool | None:
        left, right = first(item), second(item)
        if left is False or right is False:
            return False
        if left is None or right is None:
            return None
        return True

    return evaluate


def _or(first: Predicate, second: Predicate) -> Predicate:
    def evaluate(item: Any) -> bool | None:
        left, right = first(item), second(item)
        if left is True or right is True:
            return True
        if left is None or right is None:
            return None
        return False

    return evaluate


def _resolve_is(node: TypeOperation, scope: Scope) -> Predicate:
    """Compile `resolve() is Type` on a Reference, decided without resolving."""
    if not (isinstance(node.base, Call) and node.base.name == "resolve" and node.base.base is None):
        raise CompileError("`is` is only supported as `resolve() is Type`")
    if scope.type_name != "Reference":
        raise CompileError(f"resolve() on {scope.type_name}")
    wanted = node.type_name

    def check(item: Any) -> bool:
        if not isinstance(item, dict):
            return False
        reference = item.get("reference")
        found = reference_type(reference) if isinstance(reference, str) else None
        if found is None:
            # Reference.type may be a bare type or a StructureDefinition URL.
            declared = item.get("type")
            found = declared.rsplit("/", 1)[-1] if isinstance(declared, str) else None
        return found == wanted

    return check


def compile_expression(
    expression: str, resource_type: str, focus: Scope | None = None
) -> list[Branch]:
    """Compile one search expression for one resource type (or for a composite's focus)."""
    tree = fhirpath.parse(expression)
    if focus is None:
        model = get_fhir_model_class(resource_type)
        focus = Scope(resource_type, model, resource_type, True)
    branches: list[Branch] = []
    for term in fhirpath.union_terms(tree):
        branches.extend(compile_node(term, focus))
    return branches
