"""Closures and dependency order over any reference function (no I/O of its own)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import StoreError

RefsFn = Callable[[str], Iterable[str]]


def closure_set(paths: Iterable[str], references: RefsFn) -> set[str]:
    """Every path reachable from ``paths`` through ``references`` (the paths included)."""
    seen: set[str] = set()
    todo = list(paths)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(r for r in references(p) if r not in seen)
    return seen


def topo_sort(paths: Iterable[str], references: RefsFn) -> list[str]:
    """``paths`` ordered so that every path comes after its references within the set.

    The order is that of ``nix-store --export``: the post-order of a depth-first walk over the
    set sorted by base name (i.e. by path), visiting references in sorted order; references
    outside the set are not followed. Self references are ignored; a cycle is an error.
    """
    members = set(paths)
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(members):
        if state.get(start) == 2:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(r for r in references(start) if r in members))]
        state[start] = 1
        while stack:
            p, pending = stack[-1]
            while pending:
                r = pending.pop(0)
                if r == p:
                    continue
                st = state.get(r)
                if st == 2:
                    continue
                if st == 1:
                    raise StoreError("cycle in the reference graph", path=r, rule="cycle")
                state[r] = 1
                stack.append((r, sorted(x for x in references(r) if x in members)))
                break
            else:
                stack.pop()
                state[p] = 2
                order.append(p)
    return order
