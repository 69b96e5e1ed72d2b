"""The package layers: ``launch -> pretrain -> eval_probes -> (models, data, losses) -> data.common``.

Imports only point down (checked on the source with ``ast``, imports inside functions included),
no package is imported by a name string or through an edited ``sys.path``, and the ``pretrain``
command turns only user errors into a one-line exit.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "pretrain", "eval_probes", "models", "data", "losses")
RANK = {"launch": 4, "pretrain": 3, "eval_probes": 2, "models": 1, "data": 1, "losses": 1, "data.common": 0}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _files():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if ".venv" not in path.parts:
                yield path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _layer(module: str) -> str | None:
    """``data.common`` for the ground floor, else the top-level project package (None: not ours)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[:2] == ["data", "common"]:
        return "data.common"
    return parts[0]


def _imports(path: Path):
    """``(line, absolute module name)`` of every import in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else target


def _violation(importer: str, imported: str) -> str | None:
    """Why ``importer``'s layer may not import ``imported``, or None."""
    src, dst = _layer(importer), _layer(imported)
    top = imported.split(".")[0]
    if src == "data.common":  # the ground floor: the standard library, and PyYAML for recipes (config.py)
        if dst not in (None, "data.common") or (dst is None and top not in STDLIB | {"yaml"}):
            return "data.common imports only the standard library and yaml"
        return None
    if src == "losses" and dst is None and top not in STDLIB and top != "torch":
        return "losses imports only torch and the standard library"
    if dst is None or dst == src:
        return None
    if RANK[dst] > RANK[src]:
        return f"upward import: {src} (layer {RANK[src]}) imports {dst} (layer {RANK[dst]})"
    if RANK[dst] == RANK[src]:
        return f"{src} and {dst} are on the same layer and may not import each other"
    return None


def test_imports_only_point_down():
    bad = []
    for path in _files():
        importer = _module_name(path)
        for line, imported in _imports(path):
            why = _violation(importer, imported)
            if why:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}: {why}")
    assert not bad, "\n".join(bad)


def test_the_layer_rules_themselves():
    assert _violation("eval_probes.search.embed", "pretrain.encoders")
    assert _violation("models.resnet", "data.datasets")
    assert _violation("data.loader", "models")
    assert _violation("losses.clip", "numpy")
    assert _violation("data.common.atomic", "data.datasets")
    assert _violation("data.common.atomic", "numpy")
    assert _violation("launch.cli", "pretrain") is None
    assert _violation("models.registry", "data.common") is None
    assert _violation("data.datasets", "data.common") is None
    assert _violation("losses.clip", "torch.nn") is None


def _dynamic_imports_and_path_edits(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if not isinstance(arg, ast.Constant):
                    yield node.lineno, f"{name}() of a computed name"
                elif str(arg.value).lstrip(".").split(".")[0] in PACKAGES or str(arg.value).startswith("."):
                    yield node.lineno, f"{name}({arg.value!r})"
            if name == "addsitedir":
                yield node.lineno, "site.addsitedir()"
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            yield node.lineno, "sys.path"


def test_no_imports_by_name_string_and_no_sys_path_edits():
    bad = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in _files()
           for line, what in _dynamic_imports_and_path_edits(path)]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------
# the error policy of the command


def test_internal_errors_propagate_out_of_the_command(monkeypatch, capsys):
    import models
    from launch.cli import main

    for exc in (ValueError("a bug, not bad input"), RuntimeError("a bug"), FileNotFoundError("/internal/file")):
        def broken():
            raise exc

        monkeypatch.setattr(models, "list_backbones", broken)
        with pytest.raises(type(exc)) as info:
            main(["list"])
        assert info.value is exc
        assert "error:" not in capsys.readouterr().err


def test_user_errors_are_one_line_with_exit_code_2(monkeypatch, capsys):
    import models
    from data.common import PathNotFoundError, UnknownNameError, UserError
    from launch.cli import main

    for exc in (UserError("the recipe says 3 and 4"), UnknownNameError("unknown backbone 'x'"),
                PathNotFoundError("run directory 'r' does not exist")):
        def broken():
            raise exc

        monkeypatch.setattr(models, "list_backbones", broken)
        assert main(["list"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"pretrain list: error: {exc}"]

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "list_backbones", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "pretrain list: interrupted"


def test_the_library_error_classes_are_user_errors():
    from data import DataError
    from data.common import PathNotFoundError, UnknownNameError, UserError
    from eval_probes.search import SearchError
    from data.captions import CaptionError
    from launch.cli import CliError
    from pretrain.checkpoint import CheckpointNotFoundError, RunDirError
    from pretrain.config import ConfigError

    for cls in (DataError, SearchError, CaptionError, CliError, ConfigError, UnknownNameError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    for cls in (PathNotFoundError, CheckpointNotFoundError, RunDirError):
        assert issubclass(cls, UserError) and issubclass(cls, FileNotFoundError), cls


def test_run_encoders_need_the_pretrain_loader(monkeypatch, tmp_path):
    from eval_probes.search import embed

    monkeypatch.setattr(embed, "_RUN_LOADERS", type(embed._RUN_LOADERS)("run loader"))
    with pytest.raises(RuntimeError, match="import pretrain.encoders"):
        embed.load_encoder(run_dir=tmp_path)
    import pretrain.encoders

    pretrain.encoders.register_run_encoder()
    assert embed.run_loader() is pretrain.encoders.run_encoder
