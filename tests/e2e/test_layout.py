"""The house keeps its shape: each package imports only the layers below it (the data
flow of docs/architecture.md), the core loads without torch or matplotlib, and every
file the code and docs cite exists in the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Where each part of the `moesim` namespace lives in the checkout.
FOLDERS = {"topologies": "topologies", "traces": "traces", "cli": "cli", "reports": "reports"}

# What each part may import (besides itself), lowest layers first. `traces` may be
# reached from routing only lazily: the torch gates and dropping.
ALLOWED = {
    "errors": set(),
    "cores": set(),
    "inputs": {"errors"},
    "validation": {"errors"},
    "engine": set(),
    "topologies": {"errors", "inputs", "validation"},
    "config": {"errors", "inputs", "validation", "topologies"},
    "placement": {"config", "errors", "inputs"},
    "routing": {"config", "cores", "errors", "placement", "traces"},
    "comm": {"config", "routing", "errors"},
    "network": {"comm", "config", "routing", "errors"},
    "cost": {"network", "comm", "config", "routing", "errors"},
    "memory": {"config", "cost", "comm", "errors"},
    "output": {"cost", "engine", "comm", "config", "errors"},
    "tracefile": {"routing", "config", "cores", "errors", "inputs", "traces"},
    # The whole training step: a micro-batch's timeline, then the pipeline, DP, optimizer.
    "pipeline": {"config", "comm", "cost", "output", "memory", "topologies", "errors"},
    "simulation": {"config", "placement", "routing", "comm", "network", "cost", "memory",
                   "engine", "output", "tracefile", "topologies", "errors", "pipeline"},
    "traces": {"moesim", "config", "cores", "errors", "tracefile", "validation"},
    # Sweeps and plans sit on top of the simulation: they only compose runs of it.
    "sweep": {"config", "cores", "errors", "inputs", "validation", "memory", "simulation"},
    "planning": {"sweep", "config", "cost", "engine", "errors", "inputs", "validation",
                 "memory", "simulation", "topologies", "pipeline"},
    "reports": set(),
}
CORE = {"cores", "errors", "inputs", "validation", "engine", "config", "placement", "routing",
        "comm", "network", "cost", "memory",
        "output", "tracefile", "simulation", "topologies", "pipeline"}


def parts() -> dict[str, list[Path]]:
    """Every Python file of the package, by the part of the namespace it belongs to."""
    out: dict[str, list[Path]] = {}
    for path in sorted((REPO / "moesim").rglob("*.py")):
        rel = path.relative_to(REPO / "moesim")
        part = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" \
            else "moesim"
        out.setdefault(part, []).append(path)
    for part, folder in FOLDERS.items():
        out[part] = sorted((REPO / folder).rglob("*.py"))
    return out


def imports(path: Path, part: str) -> list[tuple[str, bool, int]]:
    """(imported module, imported at module load, line) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports stay inside their own part
                base = f"moesim.{part}"
            names = [base] if node.module or node.level else []
            if base == "moesim":
                names = [f"moesim.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top, node.lineno) for name in names]
    return found


def target_part(module: str) -> str | None:
    if module == "moesim":
        return "moesim"
    if not module.startswith("moesim."):
        return None
    return module.split(".")[1]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_layers_below_it(part):
    wrong = []
    for path in parts()[part]:
        for module, _, line in imports(path, part):
            target = target_part(module)
            if target not in (None, part) and target not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_core_loads_without_torch_or_matplotlib():
    heavy = []
    for part in CORE:
        for path in parts()[part]:
            for module, at_load, line in imports(path, part):
                if at_load and module.split(".")[0] in ("torch", "matplotlib", "transformers"):
                    heavy.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not heavy, "\n".join(heavy)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return [REPO / n for n in names
            if not n.endswith((".npz", ".parquet", ".png")) and (REPO / n).is_file()]


# Paths in other repositories that the docs cite with their repository named beside them.
ELSEWHERE = {
    "docs/legacy.md",  # deepseek-ai/DeepEP
    "docs/POWER_LAW_DISTRIBUTION.md",  # ai-dynamo/aiconfigurator
    "tests/test_intranode.py", "tests/test_internode.py",  # deepseek-ai/DeepEP
    "tests/test_low_latency.py",  # deepseek-ai/DeepEP
    "docs/performance-summary.md", "docs/performance-summary-archive.md",  # Megatron-Bridge
}
GENERATED = ("reports/out",)  # what `make demo` writes; never in a fresh clone
CITED = re.compile(r"(?<![\w./-])((?:moesim|traces|topologies|cli|reports|bench|docs|"
                   r"examples|tests)/[\w./-]*\w)(?![\w./-]*[*{])")  # globs are not paths


def test_every_cited_repository_path_exists():
    missing = []
    for path in tracked_text_files():
        for match in CITED.finditer(path.read_text(errors="ignore")):
            cited = match.group(1)
            if cited in ELSEWHERE or cited.startswith(GENERATED):
                continue
            if not (REPO / cited).exists():
                missing.append(f"{path.relative_to(REPO)} cites {cited}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_nothing_cites_files_outside_the_repository():
    outside = [str(p.relative_to(REPO)) for p in tracked_text_files()
               if re.search(r"\.\./shared|shared/reference|ROUTING\.md|seeds/00",
                            p.read_text(errors="ignore"))
               and p.relative_to(REPO) != Path("tests/e2e/test_layout.py")]
    assert not outside


def packages() -> set[str]:
    """The folders of ``moesim/`` that hold code."""
    return {p.parent.name for p in (REPO / "moesim").glob("*/__init__.py")}


@pytest.mark.parametrize("doc, section", [("README.md", "## Layout"),
                                          ("docs/architecture.md", "## Folders")])
def test_the_layout_tables_match_the_tree(doc, section):
    text = (REPO / doc).read_text().split(section, 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+)/`", text))
    folders = {p.parent.relative_to(REPO).as_posix() for p in tracked_text_files()}
    for folder in named:
        assert (REPO / folder).is_dir() or any(f.endswith(folder) for f in folders), folder
    for package in packages():
        assert package in {name.rsplit("/", 1)[-1] for name in named}, package
