"""Print advprune's import graph: edges between its top-level modules / subpackages, and
every import cycle between modules (imports inside functions count: grimp reads them all).

    .venv/bin/python tools/import_graph.py            # summary: unit edges + cycles
    .venv/bin/python tools/import_graph.py --edges    # also every module-level edge

"Unit" is ``advprune.X`` (a subpackage or a top-level module).
"""

from __future__ import annotations

import sys

import grimp


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def sccs(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), those of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def main() -> int:
    graph = grimp.build_graph("advprune", cache_dir=None)
    modules = sorted(m for m in graph.modules if m.startswith("advprune"))
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("advprune")}
             for m in modules}  # fmt: skip
    n_edges = sum(len(v) for v in edges.values())
    unit_edges: dict[tuple[str, str], int] = {}
    for a, targets in edges.items():
        for b in targets:
            ua, ub = unit(a), unit(b)
            if ua != ub and ua != "advprune" and ub != "advprune":
                unit_edges[(ua, ub)] = unit_edges.get((ua, ub), 0) + 1
    print(f"{len(modules)} modules, {n_edges} import edges (function-level imports included)")
    print("\nunit -> units it imports (number of module edges)")
    for ua in sorted({a for a, _ in unit_edges}):
        targets = sorted((b, n) for (a, b), n in unit_edges.items() if a == ua)
        print(f"  {ua.removeprefix('advprune.')} -> "
              + ", ".join(f"{b.removeprefix('advprune.')}({n})" for b, n in targets))  # fmt: skip
    units = sorted({unit(m) for m in modules} - {"advprune"})
    uedges = {u: {b for (a, b) in unit_edges if a == u} for u in units}
    unit_cycles = sccs(units, uedges)
    mod_cycles = sccs(modules, edges)
    in_cycles = sum(len(c) for c in mod_cycles)
    print(f"\nmodule cycles: {len(mod_cycles)} (modules in a cycle: {in_cycles})")
    for c in mod_cycles:
        print("  " + ", ".join(m.removeprefix("advprune.") for m in c))
    print(f"unit cycles: {len(unit_cycles)}")
    for c in unit_cycles:
        print("  " + ", ".join(m.removeprefix("advprune.") for m in c))
    if "--edges" in sys.argv:
        for a in modules:
            for b in sorted(edges[a]):
                print(f"{a} -> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
