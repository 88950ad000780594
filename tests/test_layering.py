"""The layering stays true: no import runs upward.

Every import in every module (function-level imports included) is read from the source
with ``ast`` and checked against the rules below, lowest layer first:

    engines, build_scripts                compute and building stores: no orchestrator
    orchestrator.contracts                the shared types: no other orchestrator room
    orchestrator.core, .transport         the single-instance core; tensor transports
    orchestrator.kunserve, .policy        policies and their algorithms: pure
    orchestrator.cluster                  the MPI cluster: no front end
    orchestrator.ingress, .triton         the front ends: no cluster
    orchestrator.launch, .serve, .cli     the composition root and the command line
    orchestrator.supervisor               the front door outside the MPI job: no cluster, no launch
    triton_repo                           the Triton model: no launcher

and nothing in the product imports ``perf`` or ``tests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "build_scripts", "orchestrator", "triton_repo")

SUP = "orchestrator.supervisor"
TOP = ("orchestrator.launch", "orchestrator.serve", "orchestrator.cli", "orchestrator.__main__", SUP)
FRONT = ("orchestrator.ingress", "orchestrator.triton")
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("engines", ("orchestrator", "build_scripts")),
    ("build_scripts", ("orchestrator",)),
    ("orchestrator.contracts", ("orchestrator.core", "orchestrator.transport", "orchestrator.kunserve",
                                "orchestrator.policy", "orchestrator.cluster", *FRONT, *TOP)),
    ("orchestrator.core", ("orchestrator.transport", "orchestrator.kunserve", "orchestrator.policy",
                           "orchestrator.cluster", *FRONT, *TOP)),
    ("orchestrator.transport", ("orchestrator.core", "orchestrator.kunserve", "orchestrator.policy",
                                "orchestrator.cluster", *FRONT, *TOP)),
    ("orchestrator.kunserve", ("orchestrator.core", "orchestrator.transport", "orchestrator.policy",
                               "orchestrator.cluster", *FRONT, *TOP)),
    ("orchestrator.policy", ("orchestrator.core", "orchestrator.transport", "orchestrator.cluster", *FRONT, *TOP)),
    ("orchestrator.cluster", (*FRONT, *TOP)),
    ("orchestrator.ingress", ("orchestrator.core", "orchestrator.transport", "orchestrator.kunserve",
                              "orchestrator.policy", "orchestrator.cluster", "orchestrator.triton", *TOP)),
    ("orchestrator.triton", ("orchestrator.core", "orchestrator.transport", "orchestrator.kunserve",
                             "orchestrator.policy", "orchestrator.cluster", *TOP)),
    # It runs outside the job: no MPI cluster, no rank's composition root. ``serve`` is read
    # for its options only.
    (SUP, ("orchestrator.core", "orchestrator.transport", "orchestrator.kunserve", "orchestrator.policy",
           "orchestrator.cluster", "orchestrator.launch")),
    ("triton_repo", ("orchestrator.triton.server", "orchestrator.triton.frontend", "orchestrator.cluster",
                     "orchestrator.core", *TOP)),
    ("", ("perf", "tests")),  # the product never imports its benchmarks or tests
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here if is_package else here[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names if base]
    return out


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            me = module_name(path)
            for line, target in imports(path):
                for layer, forbidden in RULES:
                    if _under(me, layer) and any(_under(target, f) for f in forbidden):
                        found.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target} ({layer} may not)")
    return sorted(set(found))


def test_no_import_runs_upward():
    bad = violations()
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


@pytest.mark.parametrize("source,bad", [
    ("from orchestrator.cluster.messages import AddRequest\n", True),
    ("def f():\n    from orchestrator.ingress import server\n", True),
    ("from orchestrator.contracts import Topology\n", False),
])
def test_the_checker_sees_function_level_and_module_imports(tmp_path, monkeypatch, source, bad):
    """The rules apply to a policy module (a planted file): the checker is not blind."""
    planted = ROOT / "orchestrator" / "policy" / "_planted_for_layering_test.py"
    planted.write_text(source)
    try:
        assert any("_planted_for_layering_test" in v for v in violations()) == bad
    finally:
        planted.unlink()
