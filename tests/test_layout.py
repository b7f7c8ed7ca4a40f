"""The code's layout: imports run one way (core <- cache <- harvest <- train <- evaluate <- docgen <- bench), no
module imports itself through others, the install takes over no common module name, and every spelling
of the entry points works."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "cache", "harvest", "train", "evaluate", "docgen", "bench")  # each may import those before it


def imports_of(path: Path, package: str) -> list[tuple[str, int, bool]]:
    """(imported batchtopk module, line, at module level) for every import of ours in a file (of the package
    `package`), outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    out = []
    module = f"{package}.{path.stem}" if path.stem != "__init__" else package
    if path.stem == "__init__":  # a package's relative imports start from the package itself
        module += ".__init__"

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:  # relative: within this package
                    base = module.split(".")[: len(module.split(".")) - child.level]
                    name = ".".join(base + ([child.module] if child.module else []))
                    targets = [name] if child.module else [f"{name}.{a.name}" for a in child.names]
                else:
                    targets = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
                out.extend((t, child.lineno, top) for t in targets if t.startswith("batchtopk."))
            elif isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, top) for a in child.names if a.name.startswith("batchtopk."))
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(tree, True)
    return out


def product_files() -> list[tuple[str, Path]]:
    """(package, file) of every product module, subpackages (train/archs/) included."""
    return [(".".join(["batchtopk", *p.parent.relative_to(ROOT).parts]), p)
            for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]


def module_name(pkg: str, path: Path) -> str:
    return pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"


def test_imports_run_one_way_and_form_no_cycle():
    """No import runs back up the layers, and no module imports itself through others: at module level, nor
    inside a function (a circle there is one too, deferred)."""
    modules = {module_name(pkg, p) for pkg, p in product_files()}
    graph: dict[str, set[str]] = {}
    wrong = []
    for pkg, path in product_files():
        me = module_name(pkg, path)
        rank = LAYERS.index(pkg.split(".")[1])
        for target, line, _ in imports_of(path, pkg):
            layer = target.split(".")[1]
            if LAYERS.index(layer) > rank:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            mod = target.removesuffix(".__init__")
            mod = mod if mod in modules else mod.rsplit(".", 1)[0]
            if mod in modules and mod != me and path.stem != "__main__":
                graph.setdefault(me, set()).add(mod)
    assert not wrong, "imports that run back up the layers:\n" + "\n".join(wrong)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [start]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return None
    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import cycles: {cycles[:3]}"
    assert "batchtopk.train.archs.batchtopk" in graph["batchtopk.train.archs"]  # subpackages are seen too
    # the checker sees imports: the trainer imports the finisher, the core imports none of the stages
    assert "batchtopk.train.finish" in graph["batchtopk.train.trainer"]
    # stages talk through artifacts: evaluation reads a training run through train/rundir.py, never the trainer
    inside = [f"{p.relative_to(ROOT)}:{line} imports {t}" for pkg, p in product_files() if pkg == "batchtopk.evaluate"
              for t, line, _ in imports_of(p, pkg) if t.startswith(("batchtopk.train.trainer", "batchtopk.train.finish"))]
    assert not inside, inside
    assert not any(m.split(".")[1] != "core" for m in graph.get("batchtopk.core.errors", ()))


def test_no_stage_reaches_into_anothers_private_names():
    """Stages talk through public functions and artifacts: no module imports a `_private` name of another
    stage (within a stage, a module may)."""
    wrong = []
    for pkg, path in product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("batchtopk."):
                other = node.module.split(".")[1]
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and other != pkg.split(".")[1]:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(private)} from {node.module}")
    assert not wrong, wrong


def test_install_takes_over_no_common_module_name(tmp_path):
    """Hugging Face's `evaluate` and ours import side by side, away from the repository root."""
    pytest.importorskip("evaluate")
    code = ("import importlib.metadata as md, evaluate, batchtopk.evaluate.run as ours; "
            "assert callable(evaluate.load) and 'site-packages' in evaluate.__file__, evaluate.__file__; "
            "assert ours.__file__.endswith('evaluate/run.py'); "
            "print(md.distribution('batchtopk-pipeline').read_text('top_level.txt').split())")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['batchtopk']"


@pytest.mark.parametrize("module", ["harvest", "train", "evaluate", "bench", "docgen", "batchtopk.harvest",
                                    "batchtopk.train", "batchtopk.evaluate", "batchtopk.bench", "batchtopk.docgen"])
def test_every_spelling_of_the_entry_points(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"Usage: python -m {module.removeprefix('batchtopk.')}" in r.stdout


def test_the_docs_tools_old_spelling_still_works():
    """`python -m bench docs` was the docs tool before it had its own package (docgen/): it forwards there."""
    r = subprocess.run([sys.executable, "-m", "bench", "docs", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--check" in r.stdout and "Usage: python -m bench docs" in r.stdout, r.stderr[-2000:]


def test_help_fits_on_a_screen_and_names_the_recipe_options():
    for args in (["harvest"], ["train"], ["evaluate"], ["evaluate", "browse"]):
        r = subprocess.run([sys.executable, "-m", *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, COLUMNS="110"))
        assert r.returncode == 0 and len(r.stdout.splitlines()) <= 45, (args, len(r.stdout.splitlines()))
    train = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120).stdout
    full = subprocess.run([sys.executable, "-m", "train", "--help-all"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout
    assert "Recipe options (experimental); --help-all describes them:" in train and "--b-dec-init" in train
    assert "b_dec's start" not in train and "b_dec's start" in full


def test_training_commands_reexecute_with_heap_settings():
    """train and bench re-execute once with glibc's heap settings (core/memory.py); opting out keeps the
    process as it is; a setting the user gave wins."""
    code = ("import os; from batchtopk.core.memory import reexec_with_heap_settings as r; r(); "
            "print(os.getpid(), os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TOP_PAD_'))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "BATCHTOPK_MALLOC"}
    run = lambda **env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env=base | env, timeout=60).stdout.split()
    assert run()[1:] == [str(1 << 30), str(1 << 28)]
    assert run(BATCHTOPK_MALLOC="off")[1:] == ["None", "None"]
    assert run(MALLOC_TOP_PAD_="4096")[1:] == [str(1 << 30), "4096"]
    assert "reexec_with_heap_settings()" in (ROOT / "train" / "__main__.py").read_text()
