"""The layering DESIGN.md promises, checked on the source: the model reaches the kernels only through ops, never
imports parallelism, Triton, training or serving code; the kernels have no import cycle; the serving code never
reads attention internals."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsmoe"
FORBIDDEN_IN_MODEL = ("torch.distributed", "triton", "dsmoe.train", "dsmoe.infer", "dsmoe.serve",
                      "dsmoe.distributed")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(names: set[str], prefixes) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("path", sorted((PACKAGE / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_imports_no_parallelism_triton_training_or_serving(path):
    names = imports(path)
    assert not offending(names, FORBIDDEN_IN_MODEL)
    kernels = {n for n in names if n.startswith("dsmoe.kernels.")} - {"dsmoe.kernels.ops"}
    assert not kernels, f"{path.name} reaches the kernels past ops.py: {sorted(kernels)}"


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import triton.language as tl\nfrom dsmoe.kernels import grouped\n")
    names = imports(bad)
    assert offending(names, FORBIDDEN_IN_MODEL) == ["triton.language"]
    assert "dsmoe.kernels.grouped" in names


@pytest.mark.parametrize("name", [p.name for p in sorted((PACKAGE / "kernels").glob("*.py")) if p.name != "ops.py"])
def test_kernel_modules_do_not_import_ops(name):
    """ops is the door; the modules behind it never import it back (no cycle)."""
    assert "dsmoe.kernels.ops" not in imports(PACKAGE / "kernels" / name)


def test_serving_code_does_not_read_attention_internals():
    internals = ("kv_b_proj", "kv_lora_rank", "nope_dim", "qk_nope_head_dim", "v_head_dim", "head_dim", "expand_kv")
    for folder in ("infer", "serve"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            text = path.read_text()
            assert not [name for name in internals if name in text], path.name
