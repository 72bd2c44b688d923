"""Imports cost only what is used: no compiler stack for loading and generating, no tokenizer
libraries for weights alone, no torch for ``fusionlm --help``."""

from __future__ import annotations

import subprocess
import sys

COMPILER_STACK = ("torch._dynamo", "torch._inductor")


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_loading_and_generating_import_neither_compilers_nor_tokenizers(hf_llama_dir):
    directory, _ = hf_llama_dir
    modules = imported_after(
        "import fusionlm\n"
        f"model = fusionlm.load_model({str(directory)!r})\n"
        "fusionlm.generate(model, [[1, 2, 3]], max_new_tokens=3)\n"
    )
    assert "fusionlm.generation" in modules
    assert not {m for m in modules if m.startswith(COMPILER_STACK)}
    # Weights alone need no tokenizer: its libraries load with the first tokenizer.
    assert not modules & {"fusionlm.tokenizer", "tokenizers", "jinja2"}


def test_every_public_name_is_its_home_modules_object():
    import importlib

    import fusionlm

    for name in fusionlm.__all__:
        home = importlib.import_module(fusionlm._HOMES[name])
        assert getattr(fusionlm, name) is getattr(home, name), name
    assert fusionlm.TransformerDecoder.__module__ == "fusionlm.modules.decoder"


def test_import_fusionlm_imports_no_torch_until_a_name_is_used():
    assert "torch" not in imported_after("import fusionlm")
    assert "fusionlm.loading" in imported_after("import fusionlm\nfusionlm.load_model")


def test_cli_help_and_usage_errors_import_no_torch():
    for argv in (["--help"], ["generate", "--help"], ["generate", "--temperature"]):
        modules = imported_after(
            "from fusionlm.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        )
        assert "fusionlm.cli" in modules
        assert "torch" not in modules


def _import_graph() -> dict[str, set[str]]:
    """fusionlm's modules -> the fusionlm modules each imports (anywhere in the file)."""
    import ast
    from pathlib import Path

    import fusionlm

    root = Path(fusionlm.__file__).parent.parent
    graph = {}
    for path in (root / "fusionlm").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fusionlm"):
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("fusionlm")}
        graph[name] = imported - {name}
    return {name: {m for m in imported if m in graph} for name, imported in graph.items()}


def test_dependencies_run_one_way():
    """No two modules import each other, nor two of fusionlm's top-level parts (packages
    and modules); ``modules/`` imports only itself and ``errors``."""
    graph = _import_graph()
    mutual = {tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph[b]}
    assert not mutual

    def part(name: str) -> str:
        return name.split(".")[1] if "." in name else name

    parts: dict[str, set[str]] = {}
    for name, imported in graph.items():
        parts.setdefault(part(name), set()).update(
            part(m) for m in imported if part(m) != part(name)
        )
    assert not {tuple(sorted((a, b))) for a in parts for b in parts[a] if a in parts.get(b, ())}
    above = {
        (name, m)
        for name, imported in graph.items()
        if name.startswith("fusionlm.modules")
        for m in imported
        if not m.startswith(("fusionlm.modules", "fusionlm.errors"))
    }
    assert not above
