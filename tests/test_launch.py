"""The fast launch path (kernels/_launch.py): repeated specialisations of a Triton kernel launched
without Triton's per-call binding must launch exactly what Triton would.

The end-to-end check compiles the package's kernels for sm_90 in a fresh process without
TRITON_INTERPRET, under a stand-in driver that records launches (kernels/launch_check.py): every
launch site, both ways, the same compiled kernel, grid and arguments; a probe kernel over argument
variations of every kind. The key function is also tested here directly, without Triton."""
import json
import os
import subprocess
import sys

import pytest
import torch


def _launch_check(*flags):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.pop("MINICPM_INT4_FAST_LAUNCH", None)
    proc = subprocess.run([sys.executable, "-m", "minicpm_int4.kernels.launch_check", *flags], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no report (rc {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    if not report["supported"]:
        pytest.skip(f"the fast launch path is off on triton {report['triton']} (it needs >= 3.4)")
    return proc.returncode, report


@pytest.fixture(scope="module")
def checked():
    return _launch_check("--check")


def test_every_launch_site_launches_what_triton_would(checked):
    rc, report = checked
    sites = report["sites"]
    bad = [f"{s['site']}: {s['problem']}" for s in sites if s["problem"]]
    assert not bad, "\n".join(bad)
    launched = {k for s in sites for k in s["kernels"]}
    assert launched == {"_w4a16_gemv_kernel", "_splitk_reduce_kernel", "_w4a16_decode_kernel", "_w4a16_prefill_kernel",
                        "_w4a16_dequant_kernel", "_w4a8_gemm_kernel", "_act_quant_kernel"}
    assert rc == 0


def test_probe_variations_launch_what_triton_would(checked):
    rc, report = checked
    probe = report["probe"]
    assert not probe["problems"], "\n".join(probe["problems"][:10])
    # the probe revisits each variant: most of the second and third visits must be direct launches
    assert probe["fast_launches"] >= probe["variants"], probe
    assert rc == 0


# --- the generated key function, without Triton -------------------------------------------------------

def _key_fn(kinds_args, kwargs=None, tuned=(), params=None):
    from minicpm_int4.kernels._launch import _kinds, _make_key_fn

    kinds = _kinds(kinds_args, kwargs or {})
    params = params or [f"p{i}" for i in range(len(kinds_args))]
    return _make_key_fn(params, kinds, set(tuned))


def test_key_separates_what_triton_specialises():
    t = torch.zeros(64, dtype=torch.float16)
    key = _key_fn((t, 16, 2.0, None), {"N": 4})
    base = key(t, 16, 2.0, None, N=4)
    assert key(t, 32, 2.0, None, N=4) == base                 # both divisible by 16, inside int32
    different = [key(t[1:], 16, 2.0, None, N=4),              # alignment
                 key(t.float(), 16, 2.0, None, N=4),          # dtype
                 key(t, 1, 2.0, None, N=4),                   # 1: a constexpr
                 key(t, 17, 2.0, None, N=4),                  # not divisible by 16
                 key(t, 2**31, 2.0, None, N=4),               # i64
                 key(t, 2**64 - 16, 2.0, None, N=4),          # u64
                 key(t, 16, 2, None, N=4),                    # an int where a float was
                 key(t, 16, 2.0, None, N=8),                  # a constexpr's value
                 key(t, 16, 2.0, None, N=True)]               # ... and class
    assert all(d != base for d in different)
    assert len(set(different)) == len(different)


def test_key_refuses_other_argument_kinds():
    t = torch.zeros(8)
    key = _key_fn((t, 3), {"N": 4})
    for args, kwargs in [((3, 3), {"N": 4}),          # an int where a tensor was
                         ((None, 3), {"N": 4}),
                         ((t, 3), {"M": 4}),          # another keyword
                         ((t, 3, 5), {"N": 4}),       # another arity
                         ((t, 1.5), {"N": 4})]:       # a float where an int was (& 15)
        with pytest.raises((AttributeError, TypeError)):
            key(*args, **kwargs)
    # a tensor where an int was: an error, or the Tensor class in the key, which no int call recorded
    assert key(t, torch.tensor([3]), N=4)[2] is torch.Tensor
    with pytest.raises(Exception):
        key(t, t, N=4)


def test_key_holds_the_autotuners_key_values():
    t = torch.zeros(8)
    key = _key_fn((t, 16, 64), tuned=("K",), params=["x", "N", "K"])
    assert key(t, 32, 64) == key(t, 16, 64)                   # N: Triton's classes only
    assert key(t, 16, 128) != key(t, 16, 64)                  # K: the autotuner's key, by value


def test_disabled_or_interpreted_launches_go_through_the_kernel(monkeypatch):
    from minicpm_int4.kernels import _launch

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k)) or "ran"

    fl = _launch.FastLaunch.__new__(_launch.FastLaunch)
    fl.__dict__.update(kernel=Kernel(), tuner=None, jit=None, usable=True, params=[], key_fn=None, kinds=None,
                       entries={}, launches=0)
    monkeypatch.setattr(_launch, "ENABLED", False)
    assert fl[(3,)](1, 2, X=4) == "ran"
    assert calls == [((3,), (1, 2), {"X": 4})] and fl.launches == 0
    if _launch.INTERPRET:  # the interpreter's kernels are left as they are
        sentinel = object()
        assert _launch.fast_launch(sentinel) is sentinel


def test_committed_launch_costs_cover_every_launch_site():
    """benchmarks/results/cpu/triton_launch_cost*.json (benchmarks/triton_launch_cost.py) time every site
    launch_check checks, both ways; regenerate them when a site is added."""
    from minicpm_int4.kernels import launch_check

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results", "cpu")
    sites = [name for name, _ in launch_check._sites()]
    for stem in ("triton_launch_cost", "triton_launch_cost_triton3.6", "triton_launch_cost_triton3.4"):
        with open(os.path.join(root, stem + ".json")) as f:
            got = json.load(f)
        assert list(got["host_us"]) == sites == got["checked_sites"], stem
        assert all(r["fast_us"] < r["triton_us"] for r in got["host_us"].values()), stem


def test_autotuning_results_are_reused_by_a_new_process(tmp_path):
    """_common.AUTOTUNE_CACHE: the autotuned launch sites (decode, prefill, W4A8) tuned in one process are
    not timed again in the next one with the same Triton cache, which picks the same configs; with
    MINICPM_INT4_AUTOTUNE_CACHE=0 every process times them. (The stand-in driver's timings; Triton's cache
    stores configs as their attributes: the prune functions' facts live beside them, _common.tag_config.)"""
    pytest.importorskip("triton")

    def tune(**extra):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINICPM_INT4_AUTOTUNE_CACHE")}
        env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), **extra)
        proc = subprocess.run([sys.executable, "-m", "minicpm_int4.kernels.launch_check", "--tune"], env=env,
                              capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        return json.loads(lines[-1])["tune"]

    first, second = tune(), tune()
    assert first["cache"] and first["timed"] > 0
    assert second["timed"] == 0 and second["configs"] == first["configs"]
    off = tune(MINICPM_INT4_AUTOTUNE_CACHE="0")
    assert not off["cache"] and off["timed"] == first["timed"]
