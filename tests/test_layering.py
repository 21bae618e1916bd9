"""The "never imports" column of docs/ARCHITECTURE.md, checked on every import statement of the tree (AST,
imports inside functions included): a package lists the top-level modules it must not import."""

from __future__ import annotations

import ast
import re

import pytest

from tests._recipe_helpers import REPO

ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"


def rules() -> dict[str, set[str]]:
    """``{"configs/": {"data", "torch", ...}, "training/aggregator.py": {"pipeline"}}`` from the package table."""
    out: dict[str, set[str]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`[a-z_]+/`", cells[1]):
            continue
        package = cells[1].strip("`")
        never, _, file_rules = cells[3].partition(";")
        if "only project import" in never:
            never = never.split(":", 1)[1]
        out[package] = set(re.findall(r"`([a-z_]+)`", never.split("(")[0]))
        for path, target in re.findall(r"`([a-z_/]+\.py)` imports no `([a-z_]+)`", file_rules):
            out[path] = {target}
    return out


def imported_modules(path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports; relative ones stay inside)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_table_has_a_rule_for_every_package():
    table = rules()
    packages = {p.name + "/" for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages - {"bench/", "scripts/"} <= set(table), sorted(packages - set(table))
    assert table["configs/"] >= {"data", "model", "losses", "pipeline", "torch"}
    assert table["training/aggregator.py"] == {"pipeline"}


@pytest.mark.parametrize("scope", sorted(rules()))
def test_no_package_imports_what_the_table_forbids(scope):
    forbidden = rules()[scope]
    files = [REPO / scope] if scope.endswith(".py") else sorted((REPO / scope).rglob("*.py"))
    found = {f"{path.relative_to(REPO)} imports {name}" for path in files for name in imported_modules(path) & forbidden}
    assert not found, sorted(found)


def test_no_function_is_over_100_lines_outside_bench():
    long = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("bench", "tests", "runs") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 100:
                long.append(f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


@pytest.mark.parametrize("recipe", ["train_stage1.py", "train_stage2.py"])
def test_the_step_loop_names_each_step_of_a_step(recipe):
    """A reader of a recipe sees where the model runs forward and backward, where the optimizer steps, and
    where eval, logging and checkpoints are decided: each is a call in the recipe's own loop."""
    calls = {ast.unparse(node.func) for node in ast.walk(ast.parse((REPO / recipe).read_text()))
             if isinstance(node, ast.Call)}
    wanted = {"s.model", "accelerator.backward", "optimizer_step", "reduce_step", "eval_due", "step_eval",
              "s.tracker.log", "save_due", "save_checkpoint", "end_step"}
    assert wanted <= calls, sorted(wanted - calls)
