"""The docs stand alone and their commands work.

- No file of the repo cites a specification outside it (the sibling ``shared`` folder of the
  development set-up, its section numbers and document names) or a machine path: a clone has none of them.
- README.md is an entry point: at most 90 lines, no paragraph over 120 words; no comment block in
  ``configs/`` is over 3 lines (measurement history lives in docs/RESEARCH.md, docs/FIRST_HOUR.md).
- Every documented ``train_stage*.py --config FILE --set ...`` command loads.
- Every documented ``scripts/add_coord_tokens.py`` invocation parses.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from configs import ConfigError, load_config
from tests._recipe_helpers import REPO

# Assembled from pieces so that this file does not match itself.
FORBIDDEN = re.compile("|".join([
    r"\.\./" + "shared", "/" + "work/", "/" + "root/",
    r"\bSP" + r"EC\b", r"\bDES" + r"IGN\b",  # the outside documents' names, upper case
    r"\b[Ss]eed ?" + "§", r"(^|[\s(])" + "§" + r" ?[0-9]+[A-Z]?(\.[0-9]+[A-Z]?)*\b",  # their sections
    r"\b[Ss]pec[ -]?[0-9]+\.[0-9]",
]))
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "configs").rglob("*.yaml"))]


SKIP_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "wandb"}


def _tracked_text_files() -> list[str]:
    """The files git tracks; outside a git checkout (an exported tree) every file but build outputs."""
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode == 0:
        names = out.stdout.splitlines()
    else:
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(REPO).parts)]
    # tests/fixtures holds third-party data (the Qwen tokenizer's vocabulary has a token "SP""EC")
    return [p for p in names if not p.endswith((".png", ".safetensors", ".bin", ".pt", ".pyc"))
            and not p.startswith("tests/fixtures/")]


def test_no_citation_of_anything_outside_the_repo():
    hits = []
    for rel in _tracked_text_files():
        path = REPO / rel
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{rel}:{lineno}: {line.strip()[:120]}")
    assert not hits, "write the contract into docs/ instead of citing it:\n" + "\n".join(hits)


def _commands(pattern: str) -> list[tuple[str, str]]:
    """``(file, command)`` for every match; a command whose next line starts with ``error:`` is
    documented as failing and is returned as ``(file + " (error)", command)``."""
    found = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            fails = i + 1 < len(lines) and lines[i + 1].startswith("error:")
            for m in re.finditer(pattern, line):
                found.append((f"{path.relative_to(REPO)}" + (" (error)" if fails else ""), m.group(0).strip("`")))
    return found


RECIPE_COMMANDS = _commands(r"train_stage[12]\.py --config \S+\.yaml(?: --set \S+)+")


def test_some_documented_set_commands_exist():
    assert any("objective[0].config.desc_ce_weight" in cmd for _, cmd in RECIPE_COMMANDS)


@pytest.mark.parametrize("where,command", RECIPE_COMMANDS, ids=[c for _, c in RECIPE_COMMANDS])
def test_documented_recipe_commands_load(where, command, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = shlex.split(command)[1:]
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set" and "..." not in argv[i + 1]]
    expect = "stage1" if command.startswith("train_stage1") else "stage2"
    if where.endswith("(error)"):  # shown with its error line: it must fail as documented
        with pytest.raises(ConfigError):
            load_config(config, sets, expect=expect)
    else:
        load_config(config, sets, expect=expect)


def test_documented_add_coord_tokens_invocations_parse():
    from scripts.add_coord_tokens import build_parser

    calls = _commands(r"scripts/add_coord_tokens\.py [^`\n]+")
    assert calls
    for where, call in calls:
        argv = shlex.split(call.split("add_coord_tokens.py", 1)[1])
        args = build_parser().parse_args(argv)  # exits 2 (fails the test) on a wrong invocation
        assert args.out, where


def test_every_run_dir_file_is_documented():
    text = (REPO / "docs" / "RUN_DIR.md").read_text(encoding="utf-8")
    for name in ("config.merged.yaml", "config.resolved.yaml", "pipeline.json", "train.log",
                 "metrics.jsonl", "tracker_config.json", "wandb_run_id", "eval/step_<N>/", "checkpoint-<N>/"):
        assert f"`{name}" in text, name


def test_first_hour_is_linked_and_complete():
    assert "docs/FIRST_HOUR.md" in (REPO / "README.md").read_text(encoding="utf-8")
    text = (REPO / "docs" / "FIRST_HOUR.md").read_text(encoding="utf-8")
    for command in ("pip install -r requirements.txt", "python train_stage1.py --config configs/demo/stage1_shapes.yaml",
                    "python -m pytest -q", "--dry-run"):
        assert command in text, command
    assert "@@" not in text  # every output slot filled with a real output


def test_forbidden_citations_are_caught():
    for line in ["see SP" + "EC.md", "(DES" + "IGN)", "Seed " + "§9.2 parity", "seed " + "§6B.3", "§" + "5.3 canonical",
                 "#pipeline-omitted-spec" + "-52", "../" + "shared/x"]:
        assert FORBIDDEN.search(line.replace("#pipeline-omitted-spec" + "-52", "spec 5" + ".2")), line
    for line in ["ModuleSpec", "spec.config", "a design choice", "seed 0", "the spec's weight"]:
        assert not FORBIDDEN.search(line), line


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a Markdown text: blank-line separated, outside code fences; each list item
    is its own paragraph."""
    out, cur, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
            if cur:
                out.append(" ".join(cur))
            cur = []
            continue
        if fenced:
            continue
        if not line.strip() or line.lstrip().startswith(("- ", "* ", "#", "|")):
            if cur:
                out.append(" ".join(cur))
            cur = [line.lstrip()[2:]] if line.lstrip().startswith(("- ", "* ")) else []
            continue
        cur.append(line.strip())
    return out


def test_readme_is_an_entry_point():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 90, f"README.md has {len(text.splitlines())} lines (at most 90)"
    long = [p[:80] + "..." for p in _paragraphs(text) if len(p.split()) > 120]
    assert not long, f"README.md paragraphs over 120 words: {long}"
    for must in ("pip install -r requirements.txt", "python train_stage1.py --config configs/demo/stage1_shapes.yaml",
                 "python -m pytest -q", "docs/REAL_RUN.md", "docs/FIRST_HOUR.md"):
        assert must in text, must
    assert text.count("Expected") >= 3  # one expected result per command
    assert _paragraphs("a b\nc\n\n- x y\n- z\n```\nno\n```\nd") == ["a b c", "x y", "z", "d"]


def test_no_long_comment_blocks_in_configs():
    """Comment blocks of at most 3 lines: the why goes to docs/, measurements to docs/RESEARCH.md."""
    long = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        run = 0
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], 1):
            run = run + 1 if line.lstrip().startswith("#") else 0
            if run == 4:
                long.append(f"{path.relative_to(REPO)}:{lineno - 3}")
    assert not long, "comment blocks over 3 lines (move the history to docs/RESEARCH.md): " + ", ".join(long)


def test_pipeline_doc_names_only_context_methods_that_exist():
    from pipeline.context import TeacherForcingContext

    text = (REPO / "docs" / "training" / "PIPELINE.md").read_text(encoding="utf-8")
    views = text[text.index("Read only the context's derived views"):]
    views = views[: views.index("never raw")]
    names = set(re.findall(r"`([a-z_]+)[(`]", views)) | set(re.findall(r"ctx\.([a-z_]+)", text))
    assert {"coord_logits", "bbox_view"} <= names
    missing = sorted(n for n in names if not hasattr(TeacherForcingContext, n))
    assert not missing, f"docs/training/PIPELINE.md names context methods that do not exist: {missing}"
