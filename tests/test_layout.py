"""The package's layout is its data flow: each stage imports only earlier stages, nothing imports in a
circle, the web layer stands on the predictor, and the ONNX serving path never loads torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pneumoscan"

STAGES = [  # in the order the data flows; a module may import its own stage and earlier ones
    ("base", ["pneumoscan", "pneumoscan.errors", "pneumoscan.labels", "pneumoscan.io", "pneumoscan.runtime",
              "pneumoscan.config"]),
    ("figures", ["pneumoscan.metrics", "pneumoscan.plots"]),
    ("data", ["pneumoscan.data"]),
    ("preprocess", ["pneumoscan.preprocess"]),
    ("nets", ["pneumoscan.nets"]),
    ("features", ["pneumoscan.features"]),
    ("train", ["pneumoscan.train"]),
    ("export", ["pneumoscan.export"]),
    ("predict", ["pneumoscan.scope", "pneumoscan.predict"]),
    ("evaluate", ["pneumoscan.evaluate"]),
    ("explain", ["pneumoscan.explain"]),
    ("apps", ["pneumoscan.cli", "pneumoscan.web", "pneumoscan.bench", "pneumoscan.pipeline", "pneumoscan.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    assert best is not None, f"{module} belongs to no stage; add it to STAGES"
    return best[0]


def imports(path: Path, me: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported pneumoscan module, line, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pneumoscan"):
                continue
            names = [a.name for a in node.names]
            for n in names:  # "from . import x" may import a module
                sub = f"{target}.{n}"
                out.append((sub if (SRC.parent / (sub.replace(".", "/") + ".py")).exists()
                            or (SRC.parent / sub.replace(".", "/")).is_dir() else target, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("pneumoscan")]
    return out


MODULES = sorted(SRC.rglob("*.py"))


def backward(path: Path, me: str | None = None) -> list[str]:
    me = me or module_name(path)
    return [f"{path.name}:{line} {me} ({STAGES[stage(me)][0]}) imports {t} ({STAGES[stage(t)][0]})"
            for t, line, _ in imports(path, me) if stage(t) > stage(me)]


def test_every_module_imports_only_its_own_and_earlier_stages():
    wrong = [w for path in MODULES for w in backward(path)]
    assert not wrong, "imports that run against the flow:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {module_name(p): {t for t, _, top in imports(p) if top} for p in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, chain: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join(chain[chain.index(t):] + [t]))
            elif not state.get(t):
                visit(t, chain + [t])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_web_layer_stands_on_the_predictor():
    allowed = ("pneumoscan", "pneumoscan.errors", "pneumoscan.labels", "pneumoscan.predict", "pneumoscan.explain")
    wrong = [f"{p.relative_to(SRC)}:{line} imports {t}" for p in (SRC / "web").glob("*.py")
             for t, line, _ in imports(p)
             if not (t.startswith("pneumoscan.web") or t == "pneumoscan" or t.startswith(allowed[1:]))]
    assert not wrong, "the web layer reaches under the predictor:\n" + "\n".join(wrong)


def test_the_layout_check_sees_a_backward_import(tmp_path):
    """The check itself: a data-stage module importing the predictor, even inside a function, is caught."""
    bad = tmp_path / "fake.py"
    bad.write_text("from ..errors import DataError\n\ndef f():\n    from ..predict import Predictor\n")
    assert backward(bad, "pneumoscan.data.fake") == [
        "fake.py:4 pneumoscan.data.fake (data) imports pneumoscan.predict (predict)"]


TORCH_FREE = textwrap.dedent("""
    import sys
    from pneumoscan.cli import main
    rc = main(sys.argv[1:])
    loaded = sorted(m for m in ("torch", "timm", "lightning", "captum") if m in sys.modules)
    print("LOADED", ",".join(loaded))
    sys.exit(rc)
""")


@pytest.fixture(scope="module")
def onnx_model(tiny_model_dir, tmp_path_factory):
    import shutil

    from pneumoscan.export.onnx import export_onnx

    d = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "m")
    export_onnx(d)
    return d


def _loaded(argv: list[str]) -> str:
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PNEUMOSCAN_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split("LOADED")[-1].strip()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_onnx_commands_never_import_torch(command, onnx_model, dataset_dir, tmp_path):
    img = next((dataset_dir / "train" / "NORMAL").glob("*.jpeg"))
    argv = {"predict": ["-q", "predict", str(img), "--model", str(onnx_model), "--json"],
            "evaluate": ["-q", "evaluate", "--data", str(dataset_dir), "--model", str(onnx_model), "--backend", "onnx",
                         "--out", str(tmp_path / "ev"), "--n-boot", "10"]}[command]
    assert _loaded(argv) == "", f"{command} on an ONNX model imported heavy modules"
    if command == "predict":  # the probe sees torch when it is loaded
        assert "torch" in _loaded([*argv, "--backend", "torch"])


@pytest.mark.slow
def test_the_service_never_imports_torch(onnx_model):
    code = textwrap.dedent(f"""
        import io, sys
        import numpy as np
        from PIL import Image
        from fastapi.testclient import TestClient
        from pneumoscan.web.app import create_app
        from pneumoscan.web.config import ServeConfig
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # not blank: blank is refused
        buf = io.BytesIO(); Image.fromarray(noise).save(buf, "JPEG")
        with TestClient(create_app(ServeConfig(model_dir={str(onnx_model)!r})), base_url="http://127.0.0.1") as c:
            assert c.app.state.service.ready.wait(60)
            r = c.post("/api/predict", files={{"file": ("x.jpg", buf.getvalue(), "image/jpeg")}})
            assert r.status_code == 200, r.text
        print("LOADED", ",".join(m for m in ("torch", "timm", "lightning") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("LOADED"), r.stdout
