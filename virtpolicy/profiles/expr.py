"""The profile condition language: a small, safe expression language, parsed here and never `eval`ed.

    os.family == "winnt" and not os.supports("virtio1.0-net")
    machine == "q35" or domain.vcpus >= 8
    host.has("hyperv.relaxed") and firmware in ["efi", "efi-secure"]

Names are dotted paths resolved by the caller (guest OS, host, domain facts, solver variables); the only
calls are a fixed set of named predicates. There is no attribute access on values, no indexing, no
lambdas and no way to reach Python objects: anything else is a syntax error with its column.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_SOURCE = 4000
MAX_DEPTH = 32
MAX_TOKENS = 600

Value = str | int | bool | list["Value"] | None


class ExprError(ValueError):
    """A condition that does not parse or cannot be evaluated; `column` is 1-based."""

    def __init__(self, message: str, column: int = 0) -> None:
        super().__init__(message)
        self.column = column


# --- tokens -------------------------------------------------------------------------------------------
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>\d+)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,|\+|-|\*|//|%)
  | (?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*)
    """,
    re.VERBOSE,
)
KEYWORDS = {"and", "or", "not", "in", "true", "false", "none"}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    column: int


def tokenize(source: str) -> list[Token]:
    if len(source) > MAX_SOURCE:
        raise ExprError(f"condition is {len(source)} characters; the limit is {MAX_SOURCE}", 1)
    tokens: list[Token] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise ExprError(f"unexpected character {source[pos]!r}", pos + 1)
        kind = match.lastgroup or ""
        if kind != "ws":
            text = match.group()
            if kind == "name" and text in KEYWORDS:
                kind = "keyword"
            tokens.append(Token(kind, text, pos + 1))
            if len(tokens) > MAX_TOKENS:
                raise ExprError(f"condition has more than {MAX_TOKENS} tokens", pos + 1)
        pos = match.end()
    tokens.append(Token("end", "", len(source) + 1))
    return tokens


# --- syntax tree ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Literal:
    value: Value


@dataclass(frozen=True)
class Name:
    path: str
    column: int


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Node, ...]
    column: int


@dataclass(frozen=True)
class ListExpr:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


Node = Literal | Name | Call | ListExpr | Unary | Binary


class _Parser:
    def __init__(self, source: str, functions: frozenset[str]) -> None:
        self.tokens = tokenize(source)
        self.pos = 0
        self.functions = functions
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self, kind: str | None = None, text: str | None = None) -> Token:
        tok = self.peek()
        if (kind and tok.kind != kind) or (text and tok.text != text):
            want = text or kind
            got = tok.text or "end of condition"
            raise ExprError(f"expected {want!s}, found {got!r}", tok.column)
        self.pos += 1
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok.kind in ("op", "keyword") and tok.text == text

    def nested(self, parse: Callable[[], Node]) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"condition nests deeper than {MAX_DEPTH} levels", self.peek().column)
        try:
            return parse()
        finally:
            self.depth -= 1

    def parse(self) -> Node:
        node = self.or_()
        if self.peek().kind != "end":
            tok = self.peek()
            raise ExprError(f"unexpected {tok.text!r}", tok.column)
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.at("or"):
            self.pos += 1
            node = Binary("or", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.at("and"):
            self.pos += 1
            node = Binary("and", node, self.not_())
        return node

    def not_(self) -> Node:
        if self.at("not"):
            self.pos += 1
            return Unary("not", self.nested(self.not_))
        return self.comparison()

    def comparison(self) -> Node:
        node = self.sum()
        tok = self.peek()
        if tok.text in ("==", "!=", "<", "<=", ">", ">=") and tok.kind == "op":
            self.pos += 1
            return Binary(tok.text, node, self.sum())
        if self.at("in"):
            self.pos += 1
            return Binary("in", node, self.sum())
        if self.at("not") and self.tokens[self.pos + 1].text == "in":
            self.pos += 2
            return Binary("not in", node, self.sum())
        return node

    def sum(self) -> Node:
        node = self.term()
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            op = self.take().text
            node = Binary(op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.atom()
        while self.peek().kind == "op" and self.peek().text in ("*", "//", "%"):
            op = self.take().text
            node = Binary(op, node, self.atom())
        return node

    def atom(self) -> Node:
        tok = self.peek()
        if tok.kind == "number":
            self.pos += 1
            return Literal(int(tok.text))
        if tok.kind == "string":
            self.pos += 1
            return Literal(re.sub(r"\\(.)", r"\1", tok.text[1:-1]))
        if tok.kind == "keyword" and tok.text in ("true", "false", "none"):
            self.pos += 1
            return Literal({"true": True, "false": False, "none": None}[tok.text])
        if tok.kind == "op" and tok.text == "(":
            self.pos += 1
            node = self.nested(self.or_)
            self.take("op", ")")
            return node
        if tok.kind == "op" and tok.text == "[":
            self.pos += 1
            items: list[Node] = []
            while not self.at("]"):
                items.append(self.nested(self.or_))
                if not self.at("]"):
                    self.take("op", ",")
            self.take("op", "]")
            return ListExpr(tuple(items))
        if tok.kind == "op" and tok.text == "-":
            self.pos += 1
            return Binary("-", Literal(0), self.atom())
        if tok.kind == "name":
            self.pos += 1
            if "__" in tok.text:
                raise ExprError(f"'{tok.text}': names with '__' are not allowed", tok.column)
            if self.at("("):
                if tok.text not in self.functions:
                    known = ", ".join(sorted(self.functions))
                    raise ExprError(
                        f"'{tok.text}' is not a function conditions may call (they are: {known})", tok.column
                    )
                self.pos += 1
                args: list[Node] = []
                while not self.at(")"):
                    args.append(self.nested(self.or_))
                    if not self.at(")"):
                        self.take("op", ",")
                self.take("op", ")")
                return Call(tok.text, tuple(args), tok.column)
            return Name(tok.text, tok.column)
        raise ExprError(f"unexpected {tok.text or 'end of condition'!r}", tok.column)


@dataclass(frozen=True)
class Expression:
    """A parsed condition or derived value, with the names and calls it uses."""

    source: str
    tree: Node

    def names(self) -> set[str]:
        found: set[str] = set()
        _walk(self.tree, found)
        return found

    def evaluate(self, resolve: Callable[[str], Value], functions: Mapping[str, Callable[..., Value]]) -> Value:
        return _evaluate(self.tree, resolve, functions)


def _walk(node: Node, found: set[str]) -> None:
    if isinstance(node, Name):
        found.add(node.path)
    elif isinstance(node, Call):
        for arg in node.args:
            _walk(arg, found)
    elif isinstance(node, ListExpr):
        for item in node.items:
            _walk(item, found)
    elif isinstance(node, Unary):
        _walk(node.operand, found)
    elif isinstance(node, Binary):
        _walk(node.left, found)
        _walk(node.right, found)


def parse(source: str, functions: frozenset[str]) -> Expression:
    return Expression(source, _Parser(source, functions).parse())


def _number(value: Value, column: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExprError(f"expected a number, got {value!r}", column)
    return value


def _evaluate(node: Node, resolve: Callable[[str], Value], functions: Mapping[str, Callable[..., Value]]) -> Value:
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Name):
        return resolve(node.path)
    if isinstance(node, ListExpr):
        return [_evaluate(i, resolve, functions) for i in node.items]
    if isinstance(node, Call):
        return functions[node.function](*[_evaluate(a, resolve, functions) for a in node.args])
    if isinstance(node, Unary):
        return not _evaluate(node.operand, resolve, functions)
    if node.op == "and":
        return bool(_evaluate(node.left, resolve, functions)) and bool(_evaluate(node.right, resolve, functions))
    if node.op == "or":
        return bool(_evaluate(node.left, resolve, functions)) or bool(_evaluate(node.right, resolve, functions))
    left = _evaluate(node.left, resolve, functions)
    right = _evaluate(node.right, resolve, functions)
    if node.op == "==":
        return left == right
    if node.op == "!=":
        return left != right
    if node.op in ("in", "not in"):
        if not isinstance(right, list | str):
            raise ExprError(f"'{node.op}' needs a list on its right, got {right!r}")
        found = left in right
        return found if node.op == "in" else not found
    if node.op in ("<", "<=", ">", ">="):
        a, b = _number(left), _number(right)
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[node.op]
    a, b = _number(left), _number(right)
    if node.op in ("//", "%") and b == 0:
        raise ExprError("division by zero")
    return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0, "%": a % b if b else 0}[node.op]
