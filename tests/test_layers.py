"""Imports run downward only: the CLI and dev tools, then controller / replay / export (and the training
code), then the data loaders, then the numeric core and the contracts. A module may import its own
package and anything in a lower layer, never a higher one or a sibling of its own layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dtwin", "controller", "replay", "export", "forecaster", "contracts")

# Higher number = higher layer. A module's layer is that of its longest matching prefix.
LAYERS = {
    "dtwin": 5,
    "controller": 4,
    "replay": 4,
    "export": 3,
    "forecaster.models": 2, "forecaster.train": 2, "forecaster.evaluate": 2, "forecaster.figures": 2,
    "forecaster.data": 1, "forecaster.prepare": 1, "forecaster.synthetic": 1,
    "forecaster.core": 0, "contracts": 0,
    "forecaster": -1,  # the package itself holds only constants (KPI names, window, step)
}


def layer_of(module: str) -> tuple[str, int]:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_imports_run_downward_only():
    known = modules()
    bad = []
    for name, path in sorted(known.items()):
        own_prefix, own = layer_of(name)
        top = name.split(".")[0]
        for target in sorted(imports_of(path)):
            if target not in known and target.rsplit(".", 1)[0] in known:
                target = target.rsplit(".", 1)[0]  # "from pkg.mod import name"
            if target not in known:
                continue
            prefix, level = layer_of(target)
            same_package = target.split(".")[0] == top and (level == own or prefix == own_prefix)
            if level > own or (level == own and not same_package and prefix != own_prefix):
                bad.append(f"{name} (layer {own}) imports {target} (layer {level})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_cli_command_modules_do_not_import_each_other():
    known = modules()
    bad = []
    for name, path in known.items():
        if name.startswith("dtwin.commands."):
            # up reuses replay's site list; nothing imports up, so there is no circle
            bad += [f"{name} imports {t}" for t in imports_of(path)
                    if t.startswith("dtwin.commands.") and not t.startswith((name, "dtwin.commands.replay"))]
            bad += [f"{name} imports the CLI entry point" for t in imports_of(path) if t == "dtwin.cli"]
    assert not bad, "\n".join(bad)


def test_importing_the_controller_does_no_work():
    """No settings read, no patch applied, no model loaded, no app made at import."""
    import subprocess
    import sys

    code = ("import os; os.environ['DTWIN_MODEL_DIR'] = '/nonexistent'; os.environ['DTWIN_PARTITIONS'] = 'bad'\n"
            "import controller.app as m\n"
            "from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread as T\n"
            "assert not getattr(T._create_worker_consumer, 'dtwin_patched', False), 'patched at import'\n"
            "assert not [v for v in vars(m).values() if type(v).__name__ == 'App'], 'an app at import'\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
