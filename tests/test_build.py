"""setup.py's build decision on a machine without CUDA: pure Python by default, a clear error when
the CUDA build is forced, nothing attempted when it is switched off."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(env_value):
    env = dict(os.environ)
    env.pop("MINICPM_INT4_BUILD_CUDA", None)
    if env_value is not None:
        env["MINICPM_INT4_BUILD_CUDA"] = env_value
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch path")
def test_cpu_torch_installs_pure_python():
    r = _setup(None)
    assert r.returncode == 0, r.stderr
    assert "skipping the CUDA extension" in r.stderr and "has no CUDA" in r.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch path")
def test_forced_cuda_build_fails_loudly_without_cuda_torch():
    r = _setup("1")
    assert r.returncode != 0
    assert "MINICPM_INT4_BUILD_CUDA=1 but torch" in r.stderr


def test_build_switched_off():
    r = _setup("0")
    assert r.returncode == 0 and "MINICPM_INT4_BUILD_CUDA=0" in r.stderr


def test_every_kernel_source_is_built():
    # setup.py globs csrc/*.cu and csrc/*.cpp; every extern "C" launcher a .cu file defines is declared
    # once, in csrc/launchers.h, which that .cu file includes (so nvcc checks the definition against
    # the declaration: extern "C" symbols link whatever their parameters) and so does bindings.cpp
    import glob
    import re
    header = open(os.path.join(ROOT, "csrc", "launchers.h")).read()
    declared = set(re.findall(r"^(?:cudaError_t|int) (minicpm_int4_\w+)\(", header, re.M))
    defined = set()
    for cu in glob.glob(os.path.join(ROOT, "csrc", "*.cu")):
        src = open(cu).read()
        names = set(re.findall(r'extern "C" (?:cudaError_t|int) (\w+)\(', src))
        if names:
            assert '#include "launchers.h"' in src, f"{cu} defines launchers {names} but does not include launchers.h"
        defined |= names
    bindings = open(os.path.join(ROOT, "csrc", "bindings.cpp")).read()
    assert defined and defined == declared, (defined, declared)
    assert '#include "launchers.h"' in bindings and 'extern "C"' not in bindings
    assert all(name in bindings for name in declared)


def _bindings_schemas():
    """The schema strings of bindings.cpp's m.def(...) calls (adjacent C++ literals joined) and the
    names its m.impl(...) calls register."""
    import re
    src = open(os.path.join(ROOT, "csrc", "bindings.cpp")).read()
    lib = re.search(r"TORCH_LIBRARY\((\w+), m\)\s*\{(.*?)\n\}", src, re.S)
    impl = re.search(r"TORCH_LIBRARY_IMPL\((\w+), CUDA, m\)\s*\{(.*?)\n\}", src, re.S)
    assert lib and impl and lib.group(1) == impl.group(1) == "minicpm_int4_C"
    defs = ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', d)) for d in re.findall(r"m\.def\((.*?)\);", lib.group(2), re.S)]
    impls = re.findall(r'm\.impl\("(\w+)"', impl.group(2))
    return defs, impls


def test_bindings_schemas_parse_and_every_op_has_a_cuda_kernel():
    # A schema typo would only surface when `import minicpm_int4._C` runs on a GPU machine; torch's own
    # parser finds it here. The CPU torch has no CUDA headers to build the extension, but the same parser.
    defs, impls = _bindings_schemas()
    schemas = {}
    for d in defs:
        s = torch._C.parse_schema("minicpm_int4_C::" + d)
        schemas[s.name.split("::")[1]] = s
    assert sorted(schemas) == sorted(impls) == ["quantize_per_token_int8", "w4a16_gemm", "w4a16_gemm_out", "w4a8_gemm"]
    args = {name: [(a.name, str(a.type)) for a in s.arguments] for name, s in schemas.items()}
    weight = [("x", "Tensor"), ("qweight", "Tensor"), ("scales", "Tensor"), ("zeros", "Tensor"),
              ("bias", "Optional[Tensor]"), ("group_size", "int")]
    # ops.py calls w4a16_gemm(x, qweight, scales, zeros, bias, group_size, 0, input_scale, input_perm)
    # and quantize_per_token_int8(x, input_scale, input_perm); the bench / gpu tests pass the variant and
    # leave the input scale and channel order out: every form must bind (ops._cuda_ext refuses a _C
    # whose w4a16_gemm lacks input_perm: one built from an older checkout)
    scale = [("input_scale", "Optional[Tensor]"), ("input_perm", "Optional[Tensor]")]
    assert args["w4a16_gemm"] == weight + [("variant", "int")] + scale
    assert args["w4a16_gemm_out"] == weight + [("out", "Tensor"), ("variant", "int")] + scale
    assert schemas["w4a16_gemm_out"].arguments[6].alias_info.is_write
    assert all(s.arguments[-3].default_value == 0 for n, s in schemas.items() if n.startswith("w4a16"))
    assert all(s.arguments[-1].default_value is None and s.arguments[-2].default_value is None
               for n, s in schemas.items() if n != "w4a8_gemm")
    assert args["quantize_per_token_int8"] == [("x", "Tensor")] + scale
    assert len(schemas["quantize_per_token_int8"].returns) == 2
    # ops.py calls w4a8_gemm(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype)
    assert args["w4a8_gemm"] == [("x_q", "Tensor"), ("x_scale", "Tensor")] + weight[1:] + [
        ("out_dtype", "int"), ("block_rows", "int"), ("kernel", "int")]  # (ScalarType: an int in a parsed schema)
    assert schemas["w4a8_gemm"].arguments[-1].default_value == 0  # ops.py leaves it to the launcher
    assert len(schemas["w4a8_gemm"].returns) == 1


def _setup_function(name):
    """One function of setup.py (compiled with its imports and the rest: _setup_module)."""
    return _setup_module()[name]


@pytest.mark.parametrize("caps, expected", [
    ([], "8.0;8.6;8.9;9.0a"),            # no GPU visible: every arch the package supports
    ([(9, 0)], "9.0a"),                   # an H100 / H200: the arch-specific target CI compiles and inspect-cuda reads
    ([(9, 0), (9, 0)], "9.0a"),
    ([(8, 0)], None),                     # other GPUs: torch's own choice (each GPU's arch)
    ([(9, 0), (8, 6)], None),
    ([(12, 0)], None),
])
def test_default_arch_list_builds_hopper_as_sm90a(caps, expected):
    from types import SimpleNamespace
    cuda = SimpleNamespace(is_available=lambda: bool(caps), device_count=lambda: len(caps),
                           get_device_capability=lambda i: caps[i])
    assert _setup_function("_default_arch_list")(SimpleNamespace(cuda=cuda)) == expected


def _top_level_args(src, start):
    """The top-level comma-separated arguments of the call whose '(' is at src[start - 1]."""
    args, depth, i, begin, in_str = [], 1, start, start, False
    while depth:
        c = src[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 1:
            args.append(src[begin:i].strip())
            begin = i + 1
        i += 1
    args.append(src[begin:i - 1].strip())
    return args


def test_bindings_never_format_a_message_through_an_iostream():
    """The GPU image's build of minicpm_int4._C carries its own libstdc++, whose iostreams cannot format a
    number there: a TORCH_CHECK given several message pieces (formatted by a std::ostringstream compiled
    into the library) killed the process on an H200 the first time a check printed a size. Each check
    passes one literal or one msg(...) (std::to_string and std::string), which c10 passes through."""
    import re

    for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        if not name.endswith((".cpp", ".cu", ".cuh", ".h")):
            continue
        with open(os.path.join(ROOT, "csrc", name)) as f:
            src = f.read()
        code = re.sub(r"//[^\n]*", "", src)
        assert "stringstream" not in code and "std::cout" not in code and "std::cerr" not in code, name
        for m in re.finditer(r"\bTORCH_(?:CHECK|INTERNAL_ASSERT)\(", code):
            args = _top_level_args(code, m.end())
            message = args[1:]
            where = f"{name}: {code[m.start():m.start() + 80]!r}"
            assert len(message) <= 1, f"{where}: {len(message)} message pieces; pass msg(...) instead"
            if message:
                assert re.fullmatch(r'("([^"\\]|\\.)*"\s*)+', message[0]) or message[0].startswith("msg("), where


def _setup_module():
    """setup.py's imports and functions, without its last lines (which run setup())."""
    import ast
    src = open(os.path.join(ROOT, "setup.py")).read()
    body = [n for n in ast.parse(src).body
            if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
            or (isinstance(n, ast.Assign) and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["HERE"])]
    scope = {"__file__": os.path.join(ROOT, "setup.py")}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), scope)
    return scope


def _toolkit(root, headers="include"):
    """A stand-in CUDA toolkit: bin/nvcc, whose --dryrun prints the TOP line real nvcc prints, and the runtime
    header under `headers`."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\necho "#\\$ _HERE_=$(dirname "$0")"\necho "#\\$ TOP=$(dirname "$0")/.."\n')
    nvcc.chmod(0o755)
    (root / headers).mkdir(parents=True)
    (root / headers / "cuda_runtime_api.h").write_text("")
    return root


@pytest.fixture
def no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return monkeypatch


def test_cuda_toolkit_found_through_a_wrapper_nvcc(tmp_path, no_cuda_env):
    """An nvcc on PATH that is a script exec'ing the real one in another folder (this machine's
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc): torch's guess, the folder above it, has no CUDA
    headers, and the README's install failed compiling bindings.cpp (cuda_runtime_api.h: no such file) with a
    CUDA torch. The toolkit is the one nvcc itself works from."""
    tk = _toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "wrap" / "bin").mkdir(parents=True)
    wrapper = tmp_path / "wrap" / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    no_cuda_env.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    home, headers, looked = _setup_module()["_cuda_toolkit"]()
    assert (home, headers) == (str(tk), str(tk / "include"))
    assert looked == [str(tmp_path / "wrap"), str(tk)]


def test_cuda_toolkit_found_through_a_linked_nvcc_and_conda_layout(tmp_path, no_cuda_env):
    """A link to nvcc (found by the file it links to), and headers in targets/<platform>/include only (the layout
    of conda's and pip's CUDA packages), which setup.py passes to the build itself (torch adds include/ only)."""
    tk = _toolkit(tmp_path / "tk", headers="targets/x86_64-linux/include")
    (tmp_path / "link" / "bin").mkdir(parents=True)
    os.symlink(tk / "bin" / "nvcc", tmp_path / "link" / "bin" / "nvcc")
    no_cuda_env.setenv("PATH", f"{tmp_path / 'link' / 'bin'}:{os.environ['PATH']}")
    home, headers, looked = _setup_module()["_cuda_toolkit"]()
    assert (home, headers) == (str(tk), str(tk / "targets" / "x86_64-linux" / "include"))
    assert looked[0] == str(tmp_path / "link")


def test_cuda_toolkit_given_without_headers_is_not_taken(tmp_path, no_cuda_env):
    """CUDA_HOME is the user's word: no other folder is tried, and one without the runtime headers is reported
    (setup.py then installs pure Python, or fails naming the folders when the build is forced)."""
    empty = tmp_path / "cuda"
    (empty / "bin").mkdir(parents=True)
    no_cuda_env.setenv("CUDA_HOME", str(empty))
    assert _setup_module()["_cuda_toolkit"]() == (None, None, [str(empty)])
    tk = _toolkit(tmp_path / "tk")
    no_cuda_env.setenv("CUDA_HOME", str(tk))
    assert _setup_module()["_cuda_toolkit"]()[:2] == (str(tk), str(tk / "include"))


def test_cuda_toolkit_of_this_machines_nvcc(no_cuda_env):
    """The nvcc here (CI has one, a wrapper script in /usr/local/bin): the folder it works from has the headers."""
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    home, headers, _ = _setup_module()["_cuda_toolkit"]()
    assert home is not None and os.path.isfile(os.path.join(headers, "cuda_runtime_api.h"))


class _FailingBuild:
    """A stand-in for torch's BuildExtension whose build fails (a compile error, or torch's refusal of an nvcc
    whose CUDA major version differs from torch's: torch 2.8's cu128 wheel beside CUDA 13)."""
    def get_ext_fullname(self, name):
        return name

    def get_ext_filename(self, fullname):
        return fullname.replace(".", "/") + ".cpython-311-x86_64-linux-gnu.so"

    def build_extensions(self):
        raise RuntimeError("Error compiling objects for extension")


def test_failed_auto_build_installs_without_the_extension(tmp_path, capsys):
    """Unforced, a compile that fails leaves the package installable without _C (saying why, and how to make it
    an error), and removes an older build's library from the checkout, which an editable install would go on
    importing; forced (MINICPM_INT4_BUILD_CUDA=1), it fails the install."""
    from types import SimpleNamespace
    mod = _setup_module()
    mod["HERE"] = str(tmp_path)
    (tmp_path / "minicpm_int4").mkdir()
    stale = tmp_path / "minicpm_int4" / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"an older build")
    build = mod["_optional_build"](_FailingBuild, False)()
    build.extensions = [SimpleNamespace(name="minicpm_int4._C")]
    build.build_extensions()
    err = capsys.readouterr().err
    assert "failed to build" in err and "MINICPM_INT4_BUILD_CUDA=1" in err and "Error compiling" in err
    assert not stale.exists()
    class Mismatch(_FailingBuild):  # torch raises this one with its format and values apart
        def build_extensions(self):
            raise RuntimeError("The detected CUDA version (%s) mismatches the version that was used to compile "
                               "PyTorch (%s).", "13.0", "12.8")
    build = mod["_optional_build"](Mismatch, False)()
    build.extensions = [SimpleNamespace(name="minicpm_int4._C")]
    build.build_extensions()
    assert "The detected CUDA version (13.0) mismatches the version that was used to compile PyTorch (12.8)." in \
        capsys.readouterr().err
    build = mod["_optional_build"](_FailingBuild, True)()
    build.extensions = [SimpleNamespace(name="minicpm_int4._C")]
    with pytest.raises(RuntimeError, match="Error compiling"):
        build.build_extensions()
