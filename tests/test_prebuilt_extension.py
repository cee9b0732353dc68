"""benchmarks/prebuilt_extension.py: a CUDA extension built before a device call stands in for the suite's build only
where it matches the checkout, torch, Python and GPU, and loads - else it is refused, saying why."""

import importlib.util
import json
import os
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("prebuilt_extension", os.path.join(ROOT, "benchmarks",
                                                                                  "prebuilt_extension.py"))
pe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pe)

SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
BUILD = {"torch": "2.11.0+cu130", "torch_git": "abc123", "torch_cuda": "13.0"}


def _checkout(tmp_path):
    root = tmp_path / "checkout"
    (root / "csrc").mkdir(parents=True)
    (root / "csrc" / "k.cu").write_text("__global__ void k() {}\n")
    (root / "csrc" / "k.cuh").write_text("// header\n")
    (root / "setup.py").write_text("flags = ['-O3']\n")
    (root / "README.md").write_text("words\n")
    return root


def _manifest(root, **change):
    m = {"format": pe.FORMAT, "library": "_C" + SUFFIX, "sources": pe.sources_digest(str(root)), "archs": ["9.0a"],
         **BUILD}
    m.update(change)
    return m


def test_the_digest_follows_what_the_library_is_compiled_from(tmp_path):
    root = _checkout(tmp_path)
    d0 = pe.sources_digest(str(root))
    assert d0 == pe.sources_digest(str(root))
    (root / "README.md").write_text("other words\n")  # not compiled
    assert pe.sources_digest(str(root)) == d0
    for path, text in (("csrc/k.cuh", "// header, changed\n"), ("setup.py", "flags = ['-O2']\n"),
                       ("csrc/new.cu", "// a new source\n")):
        before = pe.sources_digest(str(root))
        (root / path).write_text(text)
        assert pe.sources_digest(str(root)) != before, path
    # a file's bytes moved to its neighbour's name is another tree
    (root / "csrc" / "a.cu").write_text("x")
    (root / "csrc" / "b.cu").write_text("")
    before = pe.sources_digest(str(root))
    (root / "csrc" / "a.cu").write_text("")
    (root / "csrc" / "b.cu").write_text("x")
    assert pe.sources_digest(str(root)) != before
    assert len(pe.sources_digest(ROOT)) == 64  # the package's own checkout


def test_check_takes_only_a_library_that_matches_everything(tmp_path):
    root = _checkout(tmp_path)
    kw = dict(build=BUILD, ext_suffix=SUFFIX, capability=(9, 0))
    assert pe.check(_manifest(root), str(root), **kw) is None
    refusals = {
        "format": (_manifest(root, format=0), kw),
        "other sources": (_manifest(root, sources="f" * 64), kw),
        "torch '2.11.0+cu130'": (_manifest(root), {**kw, "build": {**BUILD, "torch": "2.13.0+cu130"}}),
        "torch_git": (_manifest(root), {**kw, "build": {**BUILD, "torch_git": "def456"}}),
        "torch_cuda": (_manifest(root), {**kw, "build": {**BUILD, "torch_cuda": "12.8"}}),
        "not for this Python": (_manifest(root, library="_C.cpython-39-x86_64-linux-gnu.so"), kw),
        "this GPU is sm_80": (_manifest(root), {**kw, "capability": (8, 0)}),
    }
    for words, (manifest, kwargs) in refusals.items():
        why = pe.check(manifest, str(root), **kwargs)
        assert why is not None and words in why, (words, why)
    (root / "csrc" / "k.cu").write_text("__global__ void k() { /* changed */ }\n")
    why = pe.check(_manifest(root, sources=_manifest(_checkout(tmp_path / "old"))["sources"]), str(root), **kw)
    assert "prebuild_extension.sh again" in why


def test_check_refuses_where_torch_sees_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    root = _checkout(tmp_path)
    assert pe.check(_manifest(root), str(root), build=BUILD, ext_suffix=SUFFIX) == "torch sees no GPU"


@pytest.mark.parametrize("archs, cap, ok", [(["9.0a"], (9, 0), True), (["9.0"], (9, 0), True),
                                            (["8.0", "9.0+PTX"], (9, 0), True), (["8.0", "8.6"], (9, 0), False),
                                            (["8.6"], (8, 9), False), (["8.0;8.6"], (8, 0), False), ([], (9, 0), False)])
def test_arch_match_is_exact(archs, cap, ok):
    assert pe._arch_matches(archs, cap) is ok


def test_pack_writes_the_library_and_its_manifest(tmp_path):
    built = tmp_path / "build" / ("_C" + SUFFIX)
    built.parent.mkdir()
    built.write_bytes(b"\x7fELF not really")
    out = tmp_path / ".prebuilt"
    out.mkdir()
    (out / ("_C.cpython-39-x86_64-linux-gnu.so")).write_bytes(b"an older one")
    m = pe.pack(str(built), ["9.0a"], str(out))
    assert sorted(os.listdir(out)) == sorted(["_C" + SUFFIX, "manifest.json"])  # the older one is gone
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["sources"] == pe.sources_digest(ROOT) and m["archs"] == ["9.0a"] and m["library"] == "_C" + SUFFIX
    import torch

    assert m["torch"] == torch.__version__ and m["python"] == sys.version.split()[0]
    other = tmp_path / "build" / "_D.so"
    other.write_bytes(b"")
    with pytest.raises(SystemExit, match="not minicpm_int4._C"):
        pe.pack(str(other), ["9.0a"], str(out))


def test_install_refuses_a_stale_library_and_copies_nothing(tmp_path, capsys):
    root = _checkout(tmp_path)
    (root / "minicpm_int4").mkdir()
    folder = tmp_path / ".prebuilt"
    folder.mkdir()
    (folder / ("_C" + SUFFIX)).write_bytes(b"")
    (folder / "manifest.json").write_text(json.dumps(_manifest(root, sources="0" * 64)))
    assert pe.install(str(folder), str(root)) == 1
    assert "refused, it was built from other sources" in capsys.readouterr().out
    assert os.listdir(root / "minicpm_int4") == []
    (folder / "manifest.json").write_text("{not json")
    assert pe.install(str(folder), str(root)) == 1
    assert "unreadable" in capsys.readouterr().out


def test_install_removes_a_library_that_does_not_load(tmp_path, capsys, monkeypatch):
    """A library that matches its manifest but does not load (here: not a library at all) is removed again and
    refused, in the words of the package's own loader (ops._cuda_ext, run in a fresh interpreter)."""
    root = _checkout(tmp_path)
    pkg = root / "minicpm_int4"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    # the loader's shape (ops._cuda_ext: the import, or why not)
    (pkg / "ops.py").write_text("def _cuda_ext():\n"
                                "    try:\n"
                                "        from . import _C\n"
                                "    except Exception as e:\n"
                                "        return None, f'the CUDA extension minicpm_int4._C is not built ({e})'\n"
                                "    return _C, None\n")
    folder = tmp_path / ".prebuilt"
    folder.mkdir()
    (folder / ("_C" + SUFFIX)).write_bytes(b"\x7fELF, truncated")
    (folder / "manifest.json").write_text(json.dumps(_manifest(root)))
    monkeypatch.setattr(pe, "check", lambda manifest, root: None)
    assert pe.install(str(folder), str(root)) == 1
    out = capsys.readouterr().out
    assert "refused, it does not load here (the CUDA extension minicpm_int4._C is not built" in out
    assert sorted(os.listdir(pkg)) == ["__init__.py", "ops.py"]
    # a module that does load is installed (a Python stand-in, under the extension's name)
    (pkg / "ops.py").write_text("def _cuda_ext():\n    from . import _C\n    return _C, None\n")
    (folder / "_C.py").write_text("")
    (folder / ("_C" + SUFFIX)).unlink()
    (folder / "manifest.json").write_text(json.dumps(_manifest(root, library="_C.py")))
    assert pe.install(str(folder), str(root)) == 0
    assert f"installed {pkg / '_C.py'}" in capsys.readouterr().out
