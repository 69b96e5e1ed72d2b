"""The ground floor (``data.common``): the registry, atomic writes and the user-error classes."""
import json
import os

import pytest

from data.common import (PathNotFoundError, Registry, UnknownNameError, UserError, atomic_dir, atomic_file,
                         atomic_path, publish_dir, remove_temporaries, temp_sibling, write_bytes, write_json,
                         write_text)

# ------------------------------------------------------------------------------------------------
# Registry


def test_register_get_names_meta():
    reg = Registry("backbone")

    @reg.register("resnet18", depth=18)
    def resnet18():
        return "r18"

    assert reg.register("resnet34", len) is len  # direct form returns the object
    assert resnet18() == "r18" and reg.get("resnet18") is resnet18 and reg["resnet34"] is len
    assert reg.names() == ["resnet18", "resnet34"] == list(reg) and len(reg) == 2
    assert "resnet18" in reg and "resnet50" not in reg and 3 not in reg and [] not in reg
    assert reg.meta("resnet18") == {"depth": 18} and reg.meta("resnet34") == {}
    reg.meta("resnet18")["depth"] = 0  # a copy
    assert reg.meta("resnet18") == {"depth": 18}


def test_unknown_name_message_and_classes():
    reg = Registry("backbone")
    for n in ("resnet18", "resnet34", "vit_tiny"):
        reg.register(n, object())
    with pytest.raises(UnknownNameError) as info:
        reg.get("resnt18")
    msg = str(info.value)
    assert msg == "unknown backbone 'resnt18' (did you mean 'resnet18'?); valid backbones: resnet18, resnet34, vit_tiny"
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert info.value.kind == "backbone" and info.value.name == "resnt18" and "vit_tiny" in info.value.valid
    with pytest.raises(UnknownNameError, match=r"^unknown backbone 'xyz'; valid backbones: resnet18"):
        reg.get("xyz")
    with pytest.raises(UnknownNameError):
        reg.meta("xyz")
    with pytest.raises(UnknownNameError, match="valid re-rankers: "):
        Registry("re-ranker").get("exakt")
    empty = Registry("encoder")
    with pytest.raises(UnknownNameError, match=r"valid encoders: \(none registered\)"):
        empty.get("x")
    with pytest.raises(UnknownNameError):
        reg.get(["unhashable"])


def test_custom_error_class_plural_and_extra_valid_names():
    class DataError(UserError, ValueError):
        pass

    class UnknownDataset(UnknownNameError, DataError):
        pass

    reg = Registry("dataset", error=UnknownDataset, also_valid=("folder:PATH",))
    reg.register("mnist5k", 1)
    reg.register("digits", 2)
    with pytest.raises(DataError, match=r"unknown dataset 'mnist' \(did you mean 'mnist5k'\?\); "
                                        r"valid datasets: digits, mnist5k, folder:PATH"):
        reg.get("mnist")
    assert Registry("class", plural="classes").plural == "classes"
    with pytest.raises(TypeError):
        Registry("x", error=ValueError)


def test_duplicates_and_bad_names_are_refused():
    reg = Registry("objective")
    reg.register("byol", 1)
    with pytest.raises(ValueError, match="objective 'byol' is already registered"):
        reg.register("byol", 2)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("byol")(lambda: None)
    assert reg.get("byol") == 1
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="non-empty string"):
            reg.register(bad, 1)
    assert reg.pop("byol") == 1 and "byol" not in reg
    assert reg.pop("byol", None) is None
    with pytest.raises(KeyError):
        reg.unregister("byol")
    reg.register("byol", 3)  # free again
    assert reg["byol"] == 3


def test_the_project_registries_are_registries():
    from data.datasets import DATASETS
    from eval_probes import PROBES
    from data.captions import CAPTIONERS
    from eval_probes.search.embed import ENCODERS
    from eval_probes.search.rerank import RERANKERS
    from eval_probes.search.text import TEXT_ENCODERS
    from models.registry import BACKBONES
    from pretrain.objectives.base import OBJECTIVES

    for reg, name in ((BACKBONES, "resnet18"), (DATASETS, "mnist5k"), (OBJECTIVES, "byol"), (PROBES, "knn"),
                      (CAPTIONERS, "mnist"), (ENCODERS, "efficientnet_lite0"), (RERANKERS, "exact"),
                      (TEXT_ENCODERS, "minilm")):
        assert isinstance(reg, Registry) and name in reg.names(), (reg, name)
    assert OBJECTIVES.meta("byol")["config_cls"].__name__ == "ByolConfig"
    assert "ImageNet" in ENCODERS.meta("efficientnet_lite0")["description"]


# ------------------------------------------------------------------------------------------------
# atomic files


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_write_helpers(tmp_path):
    assert write_text(tmp_path / "a.txt", "hello") == tmp_path / "a.txt"
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    write_json(tmp_path / "c.json", {"x": 1, "p": tmp_path})
    assert (tmp_path / "a.txt").read_text() == "hello" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1, "p": str(tmp_path)}  # default=str
    write_text(tmp_path / "a.txt", "again")  # replaces
    assert (tmp_path / "a.txt").read_text() == "again"
    assert _listing(tmp_path) == ["a.txt", "b.bin", "c.json"]  # no temporary left
    mode = os.stat(tmp_path / "a.txt").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target, "w") as f:
            f.write("half of the new conte")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and _listing(tmp_path) == ["summary.json"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target, "wb") as f:
            f.write(b"new")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and _listing(tmp_path) == ["summary.json"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(target, "a"):
            pass


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "weights.bin"
    write_bytes(target, b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".weights.bin.tmp-") and not tmp.exists()
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new" and _listing(tmp_path) == ["weights.bin"]

    with pytest.raises(OSError, match="no space"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"ne")
            raise OSError("no space")
    assert target.read_bytes() == b"new" and _listing(tmp_path) == ["weights.bin"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"new"


# ------------------------------------------------------------------------------------------------
# atomic directories


def _make(d, files):
    for name, text in files.items():
        (d / name).write_text(text)


def _contents(d):
    return {p.name: p.read_text() for p in d.iterdir()}


def test_atomic_dir_creates_and_replaces(tmp_path):
    out = tmp_path / "sub" / "index"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".index.tmp-")
        _make(tmp, {"a": "1", "b": "2"})
        assert not out.exists()
    assert _contents(out) == {"a": "1", "b": "2"}
    with atomic_dir(out) as tmp:
        _make(tmp, {"c": "3"})
        assert _contents(out) == {"a": "1", "b": "2"}  # the old one stays until the new one is complete
    assert _contents(out) == {"c": "3"} and _listing(out.parent) == ["index"]


def test_failure_while_building_a_directory_keeps_the_old_one(tmp_path):
    out = tmp_path / "heads"
    with atomic_dir(out) as tmp:
        _make(tmp, {"heads.json": "old"})
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out) as tmp:
            _make(tmp, {"heads.json": "new"})
            raise OSError("disk full")
    assert _contents(out) == {"heads.json": "old"} and _listing(tmp_path) == ["heads"]


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    import data.common.atomic as atomic

    out = tmp_path / "ckpt"
    out.mkdir()
    _make(out, {"state": "old"})
    tmp = temp_sibling(out)
    tmp.mkdir()
    _make(tmp, {"state": "new"})
    real, calls = os.replace, []

    def failing_replace(src, dst):  # the second rename (new -> final) fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        publish_dir(tmp, out)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert _contents(out) == {"state": "old"}
    remove_temporaries(tmp_path)
    assert _listing(tmp_path) == ["ckpt"]


def test_remove_temporaries_cleans_up_and_recovers_a_kept_directory(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / ".meta.json.tmp-1-abcd").write_text("half")
    (tmp_path / ".tmp-step_3").mkdir()
    (tmp_path / ".idx.tmp-9-ffff").mkdir()
    (tmp_path / "step_2").mkdir()
    (tmp_path / ".step_2.old-1-aaaa").mkdir()  # superseded: step_2 exists
    (tmp_path / ".step_5.old-1-bbbb").mkdir()  # a crash between the two renames: step_5 is missing
    (tmp_path / ".step_5.old-1-bbbb" / "state").write_text("kept")
    (tmp_path / ".hidden").write_text("not ours")
    removed = {p.name for p in remove_temporaries(tmp_path)}
    assert removed == {".meta.json.tmp-1-abcd", ".tmp-step_3", ".idx.tmp-9-ffff", ".step_2.old-1-aaaa"}
    assert _listing(tmp_path) == [".hidden", "meta.json", "step_2", "step_5"]
    assert (tmp_path / "step_5" / "state").read_text() == "kept"
    assert remove_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------------
# errors


def test_user_error_classes():
    e = PathNotFoundError("run directory 'x' does not exist")
    assert isinstance(e, UserError) and isinstance(e, FileNotFoundError) and isinstance(e, OSError)
    assert str(e) == "run directory 'x' does not exist"
    assert issubclass(UnknownNameError, UserError) and issubclass(UnknownNameError, ValueError)
    assert not issubclass(UserError, (ValueError, OSError))
