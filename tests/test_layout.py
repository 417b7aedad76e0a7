"""The package's shape: no module imports another that imports it back (at any depth, function-level imports
included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "latentdiff"


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.with_suffix("").relative_to(ROOT.parent).parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    graph[name].add(target if target in modules else base)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in graph.items()}


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 20
    cycles = set()
    for start in graph:
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for following in graph[node]:
                if following == start:
                    cycles.add(" → ".join(path + (start,)))
                elif following not in path:
                    stack.append((following, path + (following,)))
    assert not cycles, sorted(cycles)[:5]


def test_links_in_readme_and_docs_lead_to_files_that_exist():
    import re

    repo = ROOT.parent
    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    assert len(pages) > 3
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_modules_that_moved_import_by_their_old_names_as_the_same_objects():
    import importlib

    import latentdiff

    for old, new in latentdiff.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    from latentdiff import clip_training
    from latentdiff.evaluation import clip_score  # the metrics, as before they moved into evaluation/metrics.py
    from latentdiff.training import clip

    assert clip_training is clip and callable(clip_score)
