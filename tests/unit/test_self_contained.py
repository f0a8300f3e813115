"""The repository stands alone: nothing in it reads or links a path outside it, and the packages
depend on each other in one direction only (no ``training -> bench``, no ``bench <-> locustfiles``).

Every check walks the files git tracks, so a new file is covered without touching this test.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Built from pieces so that this file does not match its own patterns.
_OUTSIDE = re.compile("|".join([r"\.\./" + "shared", r"(?<![\w.])" + "shared/" + "(?:data|DESIGN)"]))
_MACHINE_PATH = re.compile("/work/" + r"\w")  # the folder this repository was developed in
_PARENTS = re.compile(r"parents\[(\d+)\]")
_MD_LINK = re.compile(r"\]\(([^)\s#]+)")
# Recorded output, not code or docs: a real pytest log the agent-trace benchmark replays as a tool
# result, and profiles, which name the folder they were recorded in. Nothing reads that folder.
RECORDED = ("bench/data/", "bench/results/")

# Who may import whom. A package not named here may import anything.
FORBIDDEN_IMPORTS: dict[str, set[str]] = {
    "ccproxy": {"bench", "training", "locustfiles", "nqdata", "harness", "tests", "billing", "tools"},
    "billing": {"bench", "training", "locustfiles", "nqdata", "harness", "tests", "tools"},
    "nqdata": {"bench", "training", "locustfiles", "tests", "tools"},
    "training": {"bench", "locustfiles", "tests", "tools"},
    "locustfiles": {"bench", "training", "tests", "tools"},
    "harness": {"bench", "training", "locustfiles", "tests", "tools"},
    "bench": {"tests"},  # bench may measure training (gpu_train_check) and drive locust
}


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")  # an sdist or wheel has no tracked-file list to walk
    return [REPO / name for name in listed.stdout.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None  # binary (data, images) or deleted in the work tree


def test_no_tracked_file_names_a_path_outside_the_repository():
    offenders = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        recorded = str(path.relative_to(REPO)).startswith(RECORDED)
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line) or (not recorded and _MACHINE_PATH.search(line)):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert offenders == []


def test_no_python_file_climbs_above_the_repository_root():
    offenders = []
    for path in tracked_files():
        if path.suffix != ".py" or (text := text_of(path)) is None:
            continue
        depth = len(path.relative_to(REPO).parts) - 1  # parents[depth] is the repository root
        for match in _PARENTS.finditer(text):
            if int(match.group(1)) > depth:
                offenders.append(f"{path.relative_to(REPO)}: parents[{match.group(1)}] from depth {depth}")
    assert offenders == []


def test_no_markdown_link_leaves_the_repository():
    offenders = []
    for path in tracked_files():
        if path.suffix != ".md" or (text := text_of(path)) is None:
            continue
        for target in _MD_LINK.findall(text):
            if "://" in target or target.startswith(("mailto:", "/")):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(REPO):
                offenders.append(f"{path.relative_to(REPO)} -> {target}")
    assert offenders == []


def imported_packages(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_packages_sees_plain_nested_and_from_imports():
    source = "import bench.nq\nfrom training import data\ndef f():\n    from locustfiles.shapes import x\nfrom . import y\n"
    assert imported_packages(source) == {"bench", "training", "locustfiles"}


def test_packages_import_in_one_direction_only():
    offenders = []
    for path in tracked_files():
        relative = path.relative_to(REPO)
        if path.suffix != ".py" or len(relative.parts) < 2 or (text := text_of(path)) is None:
            continue
        forbidden = FORBIDDEN_IMPORTS.get(relative.parts[0], set())
        for name in sorted(imported_packages(text) & forbidden):
            offenders.append(f"{relative} imports {name}")
    assert offenders == []
