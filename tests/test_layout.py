"""The shape of local_swarm.py, read with `ast` (nothing is imported or run): one binding per
top-level name, sections in dependency order (no section uses a name defined in a later one), and
the module docstring's section list equal to the banners. A single file stays navigable only if
these hold; this test says when a change breaks them."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "local_swarm.py"
BANNER = re.compile(r"^# =+\n# (?P<name>[^\n]+)\n# =+$", re.M)


def sections(source: str) -> list[tuple[str, int]]:
    """(name, first line) of each banner section, in file order."""
    return [(m.group("name"), source.count("\n", 0, m.start()) + 1)
            for m in BANNER.finditer(source)]


def section_of(line: int, marks: list[tuple[str, int]]) -> int:
    """Index of the section holding `line` (-1: before the first banner)."""
    return max((i for i, (_, start) in enumerate(marks) if start <= line), default=-1)


def bound_names(node: ast.stmt) -> list[str]:
    """Top-level names a statement binds. A try/except that imports a module or falls back to
    None binds its name once (the fallback is the same binding)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, ast.Try):
        return sorted({name for stmt in node.body for name in bound_names(stmt)})
    if isinstance(node, ast.If):
        return sorted({name for stmt in node.body + node.orelse for name in bound_names(stmt)})
    return []


class _Reads(ast.NodeVisitor):
    """The global names a definition reads at run time: names loaded that no enclosing function
    binds (a parameter, an assignment, a loop or `with` target, an import, a nested def).
    Annotations are left out: under `from __future__ import annotations` they are strings that
    name types, not code the section runs."""

    def __init__(self) -> None:
        self.found: set[str] = set()
        self.scopes: list[set[str]] = []

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not any(node.id in s for s in self.scopes):
            self.found.add(node.id)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        for part in (node.target, node.value):
            if part is not None:
                self.visit(part)

    def visit_arg(self, node: ast.arg) -> None:
        pass                                        # its annotation is not run

    def _function(self, node: ast.AST) -> None:
        args = node.args
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                                  args.vararg, args.kwarg] if a is not None}
        self.scopes.append(params | _bound_inside(node))
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for stmt in (node.body if isinstance(node.body, list) else [node.body]):
            self.visit(stmt)
        self.scopes.pop()
        for decorator in getattr(node, "decorator_list", ()):
            self.visit(decorator)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def _bound_inside(function: ast.AST) -> set[str]:
    """Names bound anywhere inside a function (its nested functions' too: close enough here)."""
    names = set()
    for sub in ast.walk(function):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            names.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and sub is not function:
            names.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            names.add(sub.name)
    return names


def used_names(node: ast.AST) -> set[str]:
    """The global names a top-level statement reads at run time (see _Reads)."""
    reads = _Reads()
    reads.visit(node)
    return reads.found


@pytest.fixture(scope="module")
def module() -> tuple[str, ast.Module]:
    source = SOURCE.read_text(encoding="utf-8")
    return source, ast.parse(source)


def test_every_top_level_name_is_bound_once(module):
    source, tree = module
    seen: dict[str, int] = {}
    twice = []
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        for name in bound_names(node):
            if name in seen:
                twice.append(f"{name}: lines {seen[name]} and {node.lineno}")
            seen.setdefault(name, node.lineno)
    assert not twice, "top-level names bound more than once:\n" + "\n".join(twice)


def test_sections_depend_only_on_earlier_sections(module):
    source, tree = module
    marks = sections(source)
    home: dict[str, int] = {}
    for node in tree.body:
        for name in bound_names(node):
            home.setdefault(name, section_of(node.lineno, marks))
    later = []
    for node in tree.body:
        here = section_of(node.lineno, marks)
        for name in sorted(used_names(node) & home.keys()):
            if home[name] > here:
                later.append(f"{marks[here][0]} (line {node.lineno}, "
                             f"{(bound_names(node) or ['?'])[0]}) uses {name} from "
                             f"{marks[home[name]][0]}")
    assert not later, "sections that use later ones:\n" + "\n".join(later)


def test_the_docstring_lists_the_sections_in_order(module):
    source, tree = module
    doc = ast.get_docstring(tree) or ""
    listed = re.search(r"Sections, in dependency order.*?:\n\s+(?P<list>.+?)\.\n", doc, re.S)
    assert listed, "the module docstring has no 'Sections, in dependency order' list"
    names = [n.strip() for n in re.sub(r"\s+", " ", listed.group("list")).split(",")]
    assert names == [name for name, _ in sections(source)]
