"""Which namespaces get a level: not excluded, and matching CEDAR_MCS_SELECTOR. Pure: no I/O.

The selector grammar is Kubernetes' label selector: `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
`k notin (a,b)`, `k` (exists) and `!k` (does not exist), joined by commas (AND).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cedar.mcs_allocator.errors import InvalidSelector

Matcher = Callable[[Mapping[str, str]], bool]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s+\(([^()]*)\)$")
_EQ = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InvalidSelector(f"unbalanced ')' in selector {selector!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise InvalidSelector(f"unbalanced '(' in selector {selector!r}")
    parts.append("".join(current).strip())
    return parts


def _requirement(text: str, selector: str) -> Matcher:
    if m := _SET.match(text):
        key, op = m.group(1), m.group(3)
        values = frozenset(v.strip() for v in m.group(4).split(",") if v.strip())
        if not values:
            raise InvalidSelector(f"{text!r}: an empty value set in selector {selector!r}")
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _EQ.match(text):
        key, op, value = m.group(1), m.group(3), m.group(4)
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _EXISTS.match(text):
        negate, key = m.group(1) == "!", m.group(2)
        if negate:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise InvalidSelector(f"cannot parse {text!r} in label selector {selector!r}")


def parse_selector(selector: str | None) -> Matcher:
    """A predicate on a label map; an empty selector matches everything."""
    if selector is None or not selector.strip():
        return lambda labels: True
    requirements = [_requirement(part, selector) for part in _split(selector)]
    if any(not part for part in _split(selector)):
        raise InvalidSelector(f"empty requirement in label selector {selector!r}")
    return lambda labels: all(req(labels) for req in requirements)


@dataclass(frozen=True)
class Scope:
    excluded: frozenset[str]
    matcher: Matcher

    @classmethod
    def of(cls, excluded: Iterable[str], selector: str | None) -> Scope:
        return cls(frozenset(excluded), parse_selector(selector))

    def includes(self, name: str, labels: Mapping[str, str]) -> bool:
        return name not in self.excluded and self.matcher(labels)
