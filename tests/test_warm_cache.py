"""kernels/warm_cache.py: Triton kernels compiled here for a GPU session, found there under that machine's keys.

The build compiles the bench's Triton launches for sm_90 in a fresh process (no TRITON_INTERPRET) under
launch_check's stand-in driver; a second process, from a copy of the package somewhere else and with another
Triton cache, installs them and launches the same cases: nothing may compile. Without the install the same cases
compile (so the count can tell). The install's refusals (another Triton, target, ptxas, environment) are checked
in this process: they need no compile."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the GEMV at M = 1 on Llama-3-8B's layers up to 5000 rows: a few kernels, seconds to compile
BUILD = ["--models", "llama3-v2.5", "--max-n", "5000", "--ms", "1", "--backends", "w4a16-triton"]

LAUNCH = r"""
import json, os, sys, torch
import triton.runtime.cache
if os.environ.get("OTHER_TRITON_BUILD") == "1":  # another build of the same Triton (GPU image: Python 3.12's libtriton)
    own_key = triton.runtime.cache.triton_key
    triton.runtime.cache.triton_key = lambda: own_key() + "-another-libtriton"
from minicpm_int4.kernels import launch_check, warm_cache
src, install = sys.argv[1], sys.argv[2] == "1"
manifest = json.load(open(os.path.join(src, "manifest.json")))
report = None
if install:
    with launch_check.stand_in_driver(90):
        report = warm_cache.install(src)
before = warm_cache.cache_entries()
c = manifest["cases"]
with warm_cache._compiling_for(90, manifest["sms"]):
    for label, call in warm_cache._cases(c["models"], c["max_n"], c["ms"], c["backends"], c["group_size"],
                                         torch.float16):
        call()
print(json.dumps({"report": report, "before": before, "after": warm_cache.cache_entries(),
                  "package": os.path.dirname(warm_cache.__file__)}))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.update(extra)
    return env


def _needs_cache_keys():
    """Skips, naming why, where this triton cannot key a warm cache (warm_cache.unsupported_triton: triton < 3.6's
    runtime has no get_cache_key; CI's 3.9 and the GPU image's 3.6 have it)."""
    pytest.importorskip("triton")
    from minicpm_int4.kernels.warm_cache import unsupported_triton

    why = unsupported_triton()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _needs_cache_keys()
    out = tmp_path_factory.mktemp("warm") / "tcache"
    proc = subprocess.run([sys.executable, "-m", "minicpm_int4.kernels.warm_cache", "build", "--out", str(out), *BUILD],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[warm-cache]" in proc.stdout and "kernels for cuda 90 (132 SMs)" in proc.stdout
    with open(out / "manifest.json") as f:
        return out, json.load(f)


def _launch(src, cache_dir, install: bool, package_root=None, other_build=False):
    env = _env(TRITON_CACHE_DIR=str(cache_dir), OTHER_TRITON_BUILD="1" if other_build else "0")
    if package_root is not None:
        env["PYTHONPATH"] = str(package_root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(src), "1" if install else "0"], env=env,
                          cwd=str(package_root or ROOT), capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1])


def test_the_build_holds_each_kernel_with_its_key_parts(built):
    import triton

    out, manifest = built
    assert manifest["triton"] == triton.__version__ and manifest["target"] == {"backend": "cuda", "arch": 90,
                                                                               "warp_size": 32}
    assert manifest["failed"] == [] and manifest["env"] == [] and "ptxas" in manifest["backend_hash"]
    entries = manifest["entries"]
    assert entries and {e["name"] for e in entries} == {"_w4a16_gemv_kernel"}
    from minicpm_int4.bench.shapes import all_shapes

    assert manifest["cases"]["count"] == len([s for s in all_shapes(("llama3-v2.5",)) if s.n <= 5000])
    import tarfile

    with tarfile.open(out / "kernels.tar.xz") as tar:
        names = set(tar.getnames())
    for e in entries:  # the binary and the metadata only (the IRs stay behind: a cache hit reads neither)
        assert e["files"] == sorted([f"{e['name']}.cubin", f"{e['name']}.json"])
        assert {f"{e['hash']}/{f}" for f in e["files"]} <= names


def test_installed_kernels_are_found_by_a_copy_of_the_package_elsewhere(built, tmp_path):
    """The keys install writes are the ones the JIT computes in another process, from another checkout and with
    another build of the same Triton (whose triton_key differs: the build's own keys would never be looked up): the
    same launches then compile nothing. Without the install they compile (the count tells)."""
    from triton.runtime.cache import _base32

    src, manifest = built
    elsewhere = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "minicpm_int4"), elsewhere / "minicpm_int4",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    warm = _launch(src, tmp_path / "cache-warm", install=True, package_root=elsewhere, other_build=True)
    assert warm["package"].startswith(str(elsewhere))
    n = len(manifest["entries"])
    assert warm["report"]["installed"] == n and warm["report"]["skipped"] == [] and not warm["report"]["stale"]
    assert warm["before"] == warm["after"] == n, warm
    assert not set(os.listdir(tmp_path / "cache-warm")) & {_base32(e["hash"]) for e in manifest["entries"]}
    cold = _launch(src, tmp_path / "cache-cold", install=False)
    assert cold["before"] == 0 and cold["after"] == n, cold


def test_install_rewrites_the_metadata_and_paths_for_this_cache(built, tmp_path, monkeypatch):
    from triton.backends.compiler import GPUTarget
    from triton.runtime.cache import _base32

    from minicpm_int4.kernels import warm_cache

    src, manifest = built
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    target = GPUTarget("cuda", 90, 32)
    report = warm_cache.install(str(src), target=target)
    assert report["installed"] == len(manifest["entries"]) and report["cache_dir"] == str(tmp_path / "cache")
    assert warm_cache.cache_entries() == report["installed"]
    for d in os.listdir(tmp_path / "cache"):
        groups = [f for f in os.listdir(tmp_path / "cache" / d) if f.startswith("__grp__")]
        (grp,) = groups
        with open(tmp_path / "cache" / d / grp) as f:
            paths = json.load(f)["child_paths"]
        assert sorted(paths) == sorted(f for f in os.listdir(tmp_path / "cache" / d) if not f.startswith("__grp__"))
        assert all(p.startswith(str(tmp_path / "cache" / d)) and os.path.exists(p) for p in paths.values())
        meta = json.load(open(next(p for f, p in paths.items() if f.endswith(".json"))))
        assert _base32(meta["hash"]) == d  # this machine's key, not the build's
    again = warm_cache.install(str(src), target=target)
    assert again["installed"] == 0 and again["present"] == len(manifest["entries"])


@pytest.mark.parametrize("change, reason", [
    ({"triton": "0.0.1"}, r"built with triton 0\.0\.1, this is"),
    ({"target": {"backend": "cuda", "arch": 80, "warp_size": 32}}, r"built for cuda 80, this GPU is cuda 90"),
    ({"backend_hash": "ptxas: Cuda compilation tools, release 11.0, V11.0.1\n-90"},
     r"another backend \(ptxas\) than the build's: '.*release 11\.0, V11\.0\.1' / '.*release"),
    ({"env": [["TRITON_DEFAULT_FP_FUSION", "0"]]}, r"cache-invalidating environment variables \[\] here"),
    ({"format": 99}, r"manifest format 99"),
])
def test_install_refuses_what_this_machine_would_key_otherwise(built, tmp_path, monkeypatch, change, reason):
    from triton.backends.compiler import GPUTarget

    from minicpm_int4.kernels import warm_cache

    src, manifest = built
    other = tmp_path / "tcache"
    shutil.copytree(src, other)
    with open(other / "manifest.json", "w") as f:
        json.dump({**manifest, **change}, f)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    report = warm_cache.install(str(other), target=GPUTarget("cuda", 90, 32))
    assert report["installed"] == 0 and report["skipped"] and re.search(reason, "; ".join(report["skipped"]))
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def test_a_build_from_other_kernel_sources_is_called_stale(built, tmp_path, monkeypatch):
    from triton.backends.compiler import GPUTarget

    from minicpm_int4.kernels import warm_cache

    src, manifest = built
    other = tmp_path / "tcache"
    shutil.copytree(src, other)
    with open(other / "manifest.json", "w") as f:
        json.dump({**manifest, "kernels_digest": "0" * 64}, f)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert warm_cache.install(str(other), target=GPUTarget("cuda", 90, 32))["stale"] is True


def test_the_build_refuses_the_interpreter_and_non_triton_backends(monkeypatch):
    from minicpm_int4.kernels import INTERPRET, warm_cache

    if INTERPRET:
        with pytest.raises(RuntimeError, match="compiles the kernels: run it without TRITON_INTERPRET=1"):
            warm_cache.build("/nonexistent")
    with pytest.raises(ValueError, match=r"\['w4a16-cuda'\] run no Triton kernel"):
        warm_cache._cases(("llama3-v2.5",), 5000, (1,), ("w4a16-cuda",), 128, torch.float16)
    with pytest.raises(ValueError, match="K=4304.*not divisible by group_size=128"):  # as the bench's quantize_rtn
        warm_cache._random_int4(torch.empty(64, 4304, dtype=torch.float16), 128)
    qw, s, z = warm_cache._random_int4(torch.empty(64, 4304, dtype=torch.bfloat16), -1)
    assert (qw.shape, qw.dtype, s.shape, s.dtype, z.shape) == ((64, 538), torch.int32, (64, 1), torch.bfloat16, (64, 1))


def test_install_without_a_build_says_so(tmp_path, capsys):
    from minicpm_int4.kernels import warm_cache

    assert warm_cache.main(["install", str(tmp_path)]) == 0
    assert "no manifest.json in" in capsys.readouterr().out


def test_the_default_build_covers_the_gpu_suites_bench():
    """warm_cache's defaults follow run_gpu_suite.sh's bench: its models, --max-n, every M, and every Triton backend
    (a backend added to the suite and not here would compile on the GPU again, silently)."""
    from minicpm_int4.kernels import warm_cache

    with open(os.path.join(ROOT, "benchmarks", "run_gpu_suite.sh")) as f:
        script = f.read()
    (args,) = re.findall(r"^  BENCH_ARGS=\((--models .*?)\)$", script, flags=re.M | re.S)
    opt = dict(re.findall(r"--([a-z-]+) (\S+)", args))
    assert tuple(opt["models"].split(",")) == warm_cache.SUITE_MODELS and int(opt["max-n"]) == warm_cache.SUITE_MAX_N
    assert set(map(int, opt["ms"].split(","))) <= set(warm_cache.SUITE_MS)
    triton_backends = [b for b in opt["backends"].split(",") if re.match(r"w4a(16|8)-triton", b)]
    assert triton_backends == list(warm_cache.SUITE_BACKENDS)
    # installed right after the package, in every call that installs it
    assert "stage warm-cache 30 $PY -m minicpm_int4.kernels.warm_cache install .tcache" in script
    assert "warm-cache) parent=install ;;" in script


FLA_LAUNCH = r"""
import json, os, sys, torch
import triton.runtime.cache
own_key = triton.runtime.cache.triton_key  # another build of the same Triton, as on the GPU image
triton.runtime.cache.triton_key = lambda: own_key() + "-another-libtriton"
from minicpm_int4.kernels import launch_check, warm_cache
src = sys.argv[1]
fla = json.load(open(os.path.join(src, "manifest.json")))["fla"]
with launch_check.stand_in_driver(90):
    report = warm_cache.install(src)
    before = warm_cache.cache_entries()
    with warm_cache._as_cuda_device(*warm_cache.FLA_DEVICE):
        cases, version, why = warm_cache._fla_cases(fla["prompt_tokens"], fla["heads"], fla["head_dim"], torch.float16)
        for label, call in cases:
            call()
print(json.dumps({"report": report, "before": before, "after": warm_cache.cache_entries(), "version": version}))
"""


def _fla_site() -> str:
    """Where fla-core is (CI installs it in a site of its own, MINICPM_INT4_FLA_SITE, for these tests' processes
    alone: on the PYTHONPATH of the whole run it would become the tiny 4.6 models' linear attention in transformers)."""
    import importlib.util

    site = os.environ.get("MINICPM_INT4_FLA_SITE")
    if site:
        return site
    if importlib.util.find_spec("fla") is not None:
        return ""
    if os.environ.get("MINICPM_INT4_REQUIRE_FLA") == "1":
        pytest.fail("MINICPM_INT4_REQUIRE_FLA=1 but fla-core is neither importable nor in MINICPM_INT4_FLA_SITE")
    pytest.skip("fla-core is not installed (CI runs these tests with MINICPM_INT4_FLA_SITE)")


def test_the_profiles_fla_kernels_are_built_and_found_under_another_triton_build(tmp_path):
    """fla-core's gated delta rule kernels (MiniCPM-V 4.6's linear attention in the profile), built as transformers
    calls them - every autotune config of the chunked prefill, the recurrent decode - and installed under another
    Triton build's keys: the same calls then compile nothing."""
    _needs_cache_keys()
    site = _fla_site()
    env = _env(PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "tcache"
    proc = subprocess.run([sys.executable, "-m", "minicpm_int4.kernels.warm_cache", "build", "--out", str(out),
                           "--backends", ""], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    fla = manifest["fla"]
    assert fla["version"] and fla["count"] == 2 and fla["skipped"] is None and manifest["failed"] == []
    assert f"[warm-cache] fla-core {fla['version']}: 2 calls" in proc.stdout
    names = {e["name"] for e in manifest["entries"]}
    assert "fused_recurrent_gated_delta_rule_fwd_kernel" in names and any("chunk" in n for n in names)
    assert manifest["cases"]["count"] == 0 and len(manifest["entries"]) > 10  # (every autotune config)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", FLA_LAUNCH, str(out)], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1])
    n = len(manifest["entries"])
    assert got["version"] == fla["version"] and got["report"]["installed"] == n
    assert got["before"] == got["after"] == n, got


def test_the_fla_build_follows_the_profiles_model_and_prompt():
    """FLA_PROMPT_TOKENS, FLA_HEADS, FLA_HEAD_DIM are the profile's: its default prompt (run_profile's prompt_tokens
    and image_grid) through MiniCPMV4_6Config()'s vision tower and merger, and its linear attention's value heads and
    head size (transformers repeats q and k to the value heads before the kernel)."""
    import inspect

    from minicpm_int4.bench.e2e import run_profile
    from minicpm_int4.kernels import warm_cache
    from minicpm_int4.tiny import _transformers_class, image_inputs

    cfg = _transformers_class("MiniCPMV4_6Config")(image_token_id=10)
    text = cfg.text_config
    assert (warm_cache.FLA_HEADS, warm_cache.FLA_HEAD_DIM) == (text.linear_num_value_heads, text.linear_value_head_dim)
    assert text.linear_key_head_dim == text.linear_value_head_dim
    defaults = inspect.signature(run_profile).parameters
    # the image's tokens: the real vision tower and merger in front of a one-layer, 64-wide LLM (the count is theirs)
    text.num_hidden_layers, text.hidden_size, text.intermediate_size = 1, 64, 128
    text.layer_types = text.layer_types[:1]
    model = _transformers_class("MiniCPMV4_6ForConditionalGeneration")._from_config(cfg).eval()
    _, _, n_img = image_inputs(model, grid=defaults["image_grid"].default)
    assert warm_cache.FLA_PROMPT_TOKENS == defaults["prompt_tokens"].default + n_img


def test_an_fla_core_that_does_not_import_is_left_out_with_the_reason(tmp_path, monkeypatch):
    """A build beside an fla-core this Triton or torch cannot import still builds the rest and says why."""
    from minicpm_int4.kernels import warm_cache

    broken = tmp_path / "fla"
    (broken / "ops").mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "ops" / "__init__.py").write_text("raise ImportError('needs a newer triton')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, name)
    cases, version, why = warm_cache._fla_cases(561, 32, 128, torch.float16)
    assert (cases, version) == ([], None) and why == "fla-core did not import: ImportError: needs a newer triton"


# A gpu test module as tests/test_gpu.py writes them (beside a copy of tests/conftest.py, which skips gpu tests where
# torch sees no GPU): tensors made on "cuda", a check after each launch (none can hold where no kernel runs), a test
# that the time limit stops, one the -m gpu selection leaves out, one that skips.
GPU_TESTS = r'''
import time

import pytest
import torch

from minicpm_int4 import ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_then_prefill(dtype):
    n, k = 264, 512
    qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    scales = (torch.rand(n, k // 128) + 0.5).to(dtype).cuda()
    zeros = torch.randint(0, 16, (n, k // 128)).to("cuda").to(dtype)
    x = torch.randn(1, k, dtype=dtype, device=torch.device("cuda"))
    assert x.is_cuda  # (made on the CPU here)
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton")
    assert torch.isfinite(y).all()  # (never written here)
    torch.testing.assert_close(y, y)
    torch.cuda.synchronize()
    assert torch.isfinite(ops.w4a16_gemm(torch.randn(17, k, dtype=dtype, device="cuda"), qweight, scales, zeros,
                                         None, 128, backend="auto")).all()  # (a launch inside the check)


@pytest.mark.gpu
def test_act_quant_in_a_graph():
    from gpu_helpers import quantized_scale

    x = torch.randn(3, 1000, dtype=torch.float16, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        s = quantized_scale(x)
    g.replay()
    assert s.is_cuda


@pytest.mark.gpu
def test_the_time_limit():
    time.sleep(900)


@pytest.mark.gpu
def test_more_memory_than_its_share():  # (untouched: without the cap, the host would hand it out)
    with open("/proc/meminfo") as f:
        available = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")) * 1024
    torch.empty(int(available * 0.9), dtype=torch.uint8)


@pytest.mark.gpu
def test_skipped():
    pytest.skip("as on a GPU without the extension")


@pytest.mark.parametrize("m", [1, 2])
def test_not_gpu_marked(m):
    raise AssertionError("left out by -m gpu")
'''

# a helper module beside the tests (as tests/helpers.py), whose checks launch kernels too
GPU_HELPERS = r'''
from minicpm_int4 import ops


def quantized_scale(x):
    assert x.is_cuda
    out = {}
    assert out.setdefault("s", ops.quantize_per_token_int8(x, backend="triton")[1]).is_cuda
    return out["s"]
'''

REPLAY = r"""
import json, os, sys
import triton.runtime.cache
own_key = triton.runtime.cache.triton_key  # another build of the same Triton, as on the GPU image
triton.runtime.cache.triton_key = lambda: own_key() + "-another-libtriton"
from minicpm_int4.kernels import _warm_tests, launch_check, warm_cache
src = sys.argv[1]
report = None
if src != "-":
    with launch_check.stand_in_driver(90):
        report = warm_cache.install(src)
before = warm_cache.cache_entries()
result = _warm_tests.run(["-m", "gpu", "test_gpu_like.py", "-k", "not time_limit and not memory"])
print(json.dumps({"report": report, "before": before, "after": warm_cache.cache_entries(),
                  "names": sorted({k["name"] for k in result["keys"].values()}), "launched": len(result["keys"]),
                  "tests": result["tests"]}))
"""


def test_the_gpu_tests_kernels_are_built_by_running_them_and_found_under_another_triton_build(tmp_path):
    """--tests: a gpu test module run here on CPU tensors under the stand-in (its checks, which no unrun kernel
    could pass, evaluated and not enforced - in its helper module too -; torch.cuda's graph and synchronize standing
    in) compiles each launch it makes, those inside a check too, the sleeper stopped, the unmarked tests left out;
    installed under another Triton build's keys, the same tests then compile nothing - and without the install they
    compile what they launch."""
    _needs_cache_keys()
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tests / "conftest.py")
    (tests / "test_gpu_like.py").write_text(GPU_TESTS)
    (tests / "gpu_helpers.py").write_text(GPU_HELPERS)
    out = tmp_path / "tcache"
    proc = subprocess.run([sys.executable, "-m", "minicpm_int4.kernels.warm_cache", "build", "--out", str(out),
                           *BUILD, "--fla-tokens", "0", "--tests", "test_gpu_like.py", "--test-jobs", "2",
                           "--test-seconds", "45"], env=_env(), cwd=str(tests), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    t = manifest["tests"]
    assert t["paths"] == ["test_gpu_like.py"] and t["jobs"] == 2
    # the 6 gpu tests (the unmarked two, which would fail, left out): their checks not enforced, all pass but the
    # sleeper and the one past its process's memory share (each process capped at its share of the free memory)
    assert t["tests"] == {"failed": 2, "passed": 3, "skipped": 1}, t
    assert t["stopped"] == ["test_gpu_like.py::test_the_time_limit"]
    assert sorted(t["failed"])[0].startswith("test_gpu_like.py::test_more_memory_than_its_share: RuntimeError: ")
    assert "can't allocate memory" in sorted(t["failed"])[0], t["failed"]
    assert sorted(t["failed"])[1] == ("test_gpu_like.py::test_the_time_limit: TimeoutError: "
                                      "test_gpu_like.py::test_the_time_limit: past 45 s on the host"), t["failed"]
    assert "[warm-cache]   stopped: test_gpu_like.py::test_the_time_limit: TimeoutError" in proc.stdout
    names = {e["name"] for e in manifest["entries"]}
    # the bench's GEMV, and from the tests: the GEMV (M = 1) and, inside a check, the prefill tile (M = 17), fp16 and
    # bf16, and the quantizer, inside a check of the helper module
    assert {"_w4a16_gemv_kernel", "_w4a16_prefill_kernel", "_act_quant_kernel"} <= names, names
    assert t["count"] >= 5 and len(manifest["entries"]) > t["count"]  # (and the bench's)
    assert f"{t['count']} more kernels from its gpu tests" in proc.stdout

    env = _env(TRITON_CACHE_DIR=str(tmp_path / "cache-warm"))
    warm = subprocess.run([sys.executable, "-O", "-c", REPLAY, str(out)], env=env, cwd=str(tests),
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in warm.stdout.splitlines() if ln.startswith("{")]
    assert warm.returncode == 0 and lines, warm.stdout[-2000:] + warm.stderr[-3000:]
    warm = json.loads(lines[-1])
    n = len(manifest["entries"])
    assert warm["report"]["installed"] == n and warm["before"] == warm["after"] == n, warm
    assert "_w4a16_prefill_kernel" in warm["names"] and "_act_quant_kernel" in warm["names"]
    env = _env(TRITON_CACHE_DIR=str(tmp_path / "cache-cold"))
    cold = subprocess.run([sys.executable, "-O", "-c", REPLAY, "-"], env=env, cwd=str(tests), capture_output=True,
                          text=True, timeout=900)
    cold = json.loads([ln for ln in cold.stdout.splitlines() if ln.startswith("{")][-1])
    assert cold["before"] == 0 and cold["after"] == cold["launched"] >= t["count"], cold


def _failed_build(tmp_path, test_file):
    """The bench's few kernels and test_file's in one process, built in tmp_path: (its run, its manifest); the build
    must fail its exit code."""
    _needs_cache_keys()
    out = tmp_path / "tcache"
    proc = subprocess.run([sys.executable, "-m", "minicpm_int4.kernels.warm_cache", "build", "--out", str(out),
                           *BUILD, "--fla-tokens", "0", "--tests", test_file, "--test-jobs", "1"],
                          env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "manifest.json") as f:
        return proc, json.load(f)


def test_a_tests_pass_that_cannot_run_is_reported_and_the_rest_built(tmp_path):
    """A test file pytest cannot run (here: none there) fails the build's exit code with pytest's reason in the
    manifest, and the bench's kernels are still packed."""
    proc, manifest = _failed_build(tmp_path, "no_such_test_file.py")
    (why,) = manifest["failed"]
    assert why.startswith("the tests' pass 0/1 (no_such_test_file.py) ended with exit code 1:") and "USAGE_ERROR" in why
    assert "[warm-cache] failed: the tests' pass 0/1" in proc.stdout
    assert manifest["tests"]["count"] == 0 and {e["name"] for e in manifest["entries"]} == {"_w4a16_gemv_kernel"}


def test_the_tests_pass_needs_python_O_and_compiled_kernels(monkeypatch):
    """Without -O, an assert the pass's rewriting does not reach (a module outside the tests' folders) would stop a
    test at the first check of a kernel that never ran: refused."""
    from minicpm_int4.kernels import _warm_tests

    with pytest.raises(RuntimeError, match="run under python -O"):
        _warm_tests.run(["tests/test_gpu.py"])


def test_the_build_script_runs_the_test_files_of_the_suites_gpu_tests_stage():
    """warm_triton_cache.sh's --tests are the files run_gpu_suite.sh's gpu-tests stage runs, with its -m gpu
    (_test_pass) and its MINICPM_INT4_AUTOTUNE_CACHE=0: a test file added to the stage and not to the build would
    compile on the GPU again, silently."""
    with open(os.path.join(ROOT, "benchmarks", "run_gpu_suite.sh")) as f:
        (stage,) = [ln for ln in f.read().splitlines() if ln.startswith("stage gpu-tests ")]
    with open(os.path.join(ROOT, "benchmarks", "warm_triton_cache.sh")) as f:
        (args,) = re.findall(r"^TEST_ARGS=\(--tests (\S+)\)", f.read(), flags=re.M)
    assert re.findall(r"(tests/\S+\.py)", stage) == args.split(",")
    assert " -m gpu " in stage and "MINICPM_INT4_AUTOTUNE_CACHE=0" in stage
    from minicpm_int4.kernels import warm_cache

    source = open(warm_cache.__file__).read()
    assert '"--", "-m", "gpu", *tests]' in source and 'MINICPM_INT4_AUTOTUNE_CACHE="0"' in source


KILLED_TESTS = r'''
import os
import signal

import pytest
import torch

from minicpm_int4 import ops


@pytest.mark.gpu
def test_a_launch():
    x = torch.randn(3, 520, dtype=torch.float16, device="cuda")
    ops.quantize_per_token_int8(x, backend="triton")


@pytest.mark.gpu
def test_killed():  # (as the host's out-of-memory killer does)
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_tests_pass_killed_half_way_keeps_what_it_compiled(tmp_path):
    """A tests' process killed (the host out of memory) leaves what it compiled until then: its record is written
    after each test; the build says how it ended and fails its exit code."""
    (tmp_path / "test_killed_like.py").write_text(KILLED_TESTS)
    _, manifest = _failed_build(tmp_path, "test_killed_like.py")
    (why,) = manifest["failed"]
    assert why.startswith("the tests' pass 0/1 (test_killed_like.py) ended with exit code -9:"), why
    assert manifest["tests"]["tests"] == {"passed": 1} and manifest["tests"]["count"] >= 1
    assert "_act_quant_kernel" in {e["name"] for e in manifest["entries"]}
