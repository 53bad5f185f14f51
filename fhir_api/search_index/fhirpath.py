"""Parse the FHIRPath subset used by the R4 search parameter expressions.

Supported: member paths, `|` unions, parentheses, indexers (`[0]`), function
calls (`where`, `as`, `ofType`, `exists`, `extension`, `resolve`), the `as` and
`is` type operators, `=`/`!=` comparisons, `and`/`or`, string, boolean and
integer literals, and `%resource`. Anything else raises `FhirPathSyntaxError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*')
      | (?P<number>\d+(?:\.\d+)?)
      | (?P<variable>%[A-Za-z_][A-Za-z0-9_]*)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<symbol>!=|[.()\[\]|=,])
    )""",
    re.VERBOSE,
)


class FhirPathSyntaxError(ValueError):
    """The expression is outside the supported FHIRPath subset."""


@dataclass(frozen=True, slots=True)
class Member:
    """`base.name`, or a bare `name` on the focus when base is None."""

    base: Node | None
    name: str


@dataclass(frozen=True, slots=True)
class Call:
    """`base.name(args)`, or `name(args)` on the focus when base is None."""

    base: Node | None
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Index:
    """`base[position]`."""

    base: Node
    position: int


@dataclass(frozen=True, slots=True)
class Union:
    """`left | right`."""

    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class TypeOperation:
    """`base as Type` or `base is Type`."""

    base: Node
    operator: str
    type_name: str


@dataclass(frozen=True, slots=True)
class Binary:
    """`left op right` for `=`, `!=`, `and`, `or`."""

    left: Node
    operator: str
    right: Node


@dataclass(frozen=True, slots=True)
class Literal:
    """A string, boolean or integer literal."""

    value: str | bool | int


@dataclass(frozen=True, slots=True)
class Variable:
    """An environment variable such as `%resource`."""

    name: str


Node = Member | Call | Index | Union | TypeOperation | Binary | Literal | Variable


def _tokenize(expression: str) -> list[tuple[str, str]]:
    """Split an expression into (kind, text) tokens."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expression):
        if expression[position:].strip() == "":
            break
        match = _TOKEN.match(expression, position)
        if match is None or match.lastgroup is None:
            raise FhirPathSyntaxError(f"unexpected text at {position} in {expression!r}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive-descent parser; precedence follows the FHIRPath grammar."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = _tokenize(expression)
        self.position = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, text: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (text is not None and token[1] != text):
            raise FhirPathSyntaxError(f"expected {text or 'more'} in {self.expression!r}")
        self.position += 1
        return token

    def at(self, text: str) -> bool:
        token = self.peek()
        return token is not None and token[1] == text and token[0] in ("symbol", "name")

    def parse(self) -> Node:
        node = self.logical()
        if self.peek() is not None:
            raise FhirPathSyntaxError(f"trailing text in {self.expression!r}")
        return node

    def logical(self) -> Node:
        node = self.equality()
        while self.at("and") or self.at("or"):
            operator = self.take()[1]
            node = Binary(node, operator, self.equality())
        return node

    def equality(self) -> Node:
        node = self.union()
        while self.at("=") or self.at("!="):
            operator = self.take()[1]
            node = Binary(node, operator, self.union())
        return node

    def union(self) -> Node:
        node = self.type_expression()
        while self.at("|"):
            self.take("|")
            node = Union(node, self.type_expression())
        return node

    def type_expression(self) -> Node:
        node = self.invocation()
        while self.at("as") or self.at("is"):
            operator = self.take()[1]
            node = TypeOperation(node, operator, self.type_name())
        return node

    def type_name(self) -> str:
        kind, text = self.take()
        if kind != "name":
            raise FhirPathSyntaxError(f"expected a type name in {self.expression!r}")
        # `FHIR.Patient` and `System.String` qualify the same names.
        if text in ("FHIR", "System") and self.at("."):
            self.take(".")
            return self.type_name()
        return text

    def invocation(self) -> Node:
        node = self.term()
        while True:
            if self.at("."):
                self.take(".")
                node = self.member_or_call(node)
            elif self.at("["):
                self.take("[")
                kind, text = self.take()
                if kind != "number" or not text.isdigit():
                    raise FhirPathSyntaxError(f"only integer indexes in {self.expression!r}")
                self.take("]")
                node = Index(node, int(text))
            else:
                return node

    def term(self) -> Node:
        token = self.peek()
        if token is None:
            raise FhirPathSyntaxError(f"unexpected end of {self.expression!r}")
        kind, text = token
        if kind == "symbol" and text == "(":
            self.take("(")
            node = self.logical()
            self.take(")")
            return node
        if kind == "string":
            self.take()
            return Literal(text[1:-1].replace("\\'", "'"))
        if kind == "number":
            self.take()
            if not text.isdigit():
                raise FhirPathSyntaxError(f"decimal literals unsupported in {self.expression!r}")
            return Literal(int(text))
        if kind == "variable":
            self.take()
            return Variable(text[1:])
        if kind == "name" and text in ("true", "false"):
            self.take()
            return Literal(text == "true")
        if kind == "name":
            return self.member_or_call(None)
        raise FhirPathSyntaxError(f"unexpected {text!r} in {self.expression!r}")

    def member_or_call(self, base: Node | None) -> Node:
        kind, name = self.take()
        if kind != "name":
            raise FhirPathSyntaxError(f"expected a name in {self.expression!r}")
        if not self.at("("):
            return Member(base, name)
        self.take("(")
        args: list[Node] = []
        if name in ("as", "ofType", "is"):
            # Type specifiers are names, not expressions.
            args.append(Literal(self.type_name()))
        elif not self.at(")"):
            args.append(self.logical())
            while self.at(","):
                self.take(",")
                args.append(self.logical())
        self.take(")")
        return Call(base, name, tuple(args))


def parse(expression: str) -> Node:
    """Parse one FHIRPath expression of the supported subset into a tree."""
    return _Parser(expression).parse()


def union_terms(node: Node) -> list[Node]:
    """Flatten a tree of `|` unions into its terms, left to right."""
    if isinstance(node, Union):
        return union_terms(node.left) + union_terms(node.right)
    return [node]
