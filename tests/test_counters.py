"""The hardware-counter harness (minicpm_int4/bench/counters.py, benchmarks/ncu_counters.py) on the CPU: the ncu
command, its CSV read back and given to the right cases, the child's loop, and the parent end to end against a
stand-in ncu (a script that writes what ncu writes). ncu itself needs a GPU: the suite's `counters` stage runs it."""
import json
import os
import sys

import pytest
import torch

from minicpm_int4.bench import counters as C
from minicpm_int4.bench.backends import default_backends

ENV = {"device_name": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "commit": "abc", "timestamp_utc": "t"}


def test_default_cases_name_known_backends_decode_first():
    cases = C.default_cases()
    known = {b.name for b in default_backends()}
    assert {c["backend"] for c in cases} <= known
    # every regime (M = 1, 16, 4096) of the first shape before the second shape: a budget that runs out cuts those
    first = [c["m"] for c in cases if (c["n"], c["k"]) == C.DECODE_SHAPES[0]]
    assert first == sorted(first) and set(first) == {1, 16, 4096}
    assert [(c["n"], c["k"]) for c in cases] == sorted(((c["n"], c["k"]) for c in cases), key=C.DECODE_SHAPES.index)
    # fp16 beside every (shape, M) profiled: the yardstick of each row
    for key in {(c["n"], c["k"], c["m"]) for c in cases}:
        assert {"n": key[0], "k": key[1], "m": key[2], "backend": "fp16"} in cases
    # every backend a case names serves its M
    by_name = {b.name: b for b in default_backends()}
    assert all(by_name[c["backend"]].supports(c["m"]) for c in cases)


def test_parse_cases():
    assert C.parse_cases("14336:4096:1:w4a16-cuda, 4096:4096:16:fp16") == [
        {"n": 14336, "k": 4096, "m": 1, "backend": "w4a16-cuda"}, {"n": 4096, "k": 4096, "m": 16, "backend": "fp16"}]
    for bad, msg in (("1:2:3", "N:K:M:backend"), ("a:2:3:fp16", "integers"), ("", "no cases")):
        with pytest.raises(ValueError, match=msg):
            C.parse_cases(bad)


def test_ncu_command_leaves_the_clocks_alone_and_profiles_only_the_ranges():
    cmd = C.ncu_command("/x/ncu", "/tmp/log.csv", ["python", "-m", "child"], sections=("SpeedOfLight", "Occupancy"))
    s = " ".join(cmd)
    assert cmd[0] == "/x/ncu" and cmd[-3:] == ["python", "-m", "child"]
    for part in ("--clock-control none", "--profile-from-start off", "--csv", "--page raw", "--print-units base",
                 "--log-file /tmp/log.csv", "--section SpeedOfLight", "--section Occupancy"):
        assert part in s
    assert "--print-units" not in C.ncu_command("ncu", "l", ["c"], base_units=False)


def _row(i, kernel, dur, dram=None, extra=None):
    vals = {"gpu__time_duration.sum": dur, "dram__throughput.avg.pct_of_peak_sustained_elapsed": dram}
    vals.update(extra or {})
    return i, kernel, vals


COLUMNS = ["gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram__bytes_read.sum",
           "smsp__inst_executed.sum",
           "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
           "launch__occupancy_limit_registers", "launch__occupancy_limit_warps", "launch__occupancy_limit_shared_mem",
           "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"]
UNITS = ["nsecond", "%", "byte", "inst", "%", "register/thread", "block", "block", "block", "", "", "", "", ""]


def _csv(rows, units=UNITS, noise=True):
    """What `ncu --csv --page raw --log-file` writes: ==PROF== lines, a header, a units row, a row a kernel."""
    q = lambda xs: ",".join(f'"{x}"' for x in xs)  # noqa: E731
    head = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Block Size", "Grid Size"] + COLUMNS
    lines = ["==PROF== Connected to process 123 (python3)", "==PROF== Profiling \"k\": 0%....50%....100% - 18 passes"] if noise else []
    lines += [q(head), q([""] * 7 + units)]
    for i, kernel, vals in rows:
        lines.append(q([i, "123", "python3", "h", kernel, "(128, 1, 1)", "(896, 1, 1)"]
                       + ["" if vals.get(c) is None else vals[c] for c in COLUMNS]))
    if noise:
        lines.append("==PROF== Disconnected from process 123")
    return "\n".join(lines) + "\n"


def test_raw_csv_read_and_each_kernel_given_to_its_case():
    st = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    stalls = {st.format("long_scoreboard"): "3.1", st.format("selected"): "9.0", st.format("wait"): "0.4",
              st.format("math_pipe_throttle"): "1.2", st.format("barrier"): "0.8"}
    occupancy = {"sm__warps_active.avg.pct_of_peak_sustained_active": "61.2", "launch__registers_per_thread": "40",
                 "launch__occupancy_limit_registers": "6", "launch__occupancy_limit_warps": "8",
                 "launch__occupancy_limit_shared_mem": "32", "dram__bytes_read.sum": "29,360,128"}
    text = _csv([
        _row(0, "stray_kernel", "1,000"),                 # before the first marker: no case's
        _row(1, C.MARKER, "1,500"),
        _row(2, "w4a16_gemv_kernel", "15,250", "44.5",
             dict(stalls, **occupancy)),
        _row(3, "reduce_kernel", "2,000", "3"),
        _row(4, C.MARKER, "1,400"),
        _row(5, "gemvx_kernel", "27,000", "91"),
    ])
    rows = C.read_raw_csv(text)
    assert [r["kernel"] for r in rows] == ["stray_kernel", C.MARKER, "w4a16_gemv_kernel", "reduce_kernel", C.MARKER, "gemvx_kernel"]
    cases = [{"n": 14336, "k": 4096, "m": 1, "backend": "w4a16-triton", "bytes": 30_000_000},
             {"n": 14336, "k": 4096, "m": 1, "backend": "fp16", "bytes": 117_000_000}]
    att = C.attribute(rows, cases)
    assert "warning" not in att and [k["kernel"] for k in att["unattributed"]] == ["stray_kernel"]
    ours, fp16 = att["cases"]
    assert [k["kernel"] for k in ours["kernels"]] == ["w4a16_gemv_kernel", "reduce_kernel"]
    assert [k["kernel"] for k in fp16["kernels"]] == ["gemvx_kernel"]
    gemv = ours["kernels"][0]
    assert gemv["duration_us"] == pytest.approx(15.25) and gemv["dram_pct"] == pytest.approx(44.5)  # ns -> us, "1,000"s
    assert gemv["occupancy_pct"] == pytest.approx(61.2) and gemv["registers"] == 40
    assert gemv["dram_read_bytes"] == 29_360_128
    assert gemv["occupancy_limited_by"] == ["registers"] and gemv["blocks_per_sm_limit"] == 6
    # the largest stalls, "selected" (the warp issuing) left out
    assert gemv["top_stalls"] == [("long_scoreboard", 3.1), ("math_pipe_throttle", 1.2), ("barrier", 0.8)]
    assert ours["kernels"][1]["occupancy_pct"] is None  # a counter the row does not have: None, not 0
    ours.update(C._case_totals(ours))
    assert ours["kernels_total_us"] == pytest.approx(17.25)
    assert ours["gbps"] == pytest.approx(30e6 / 17.25e-6 / 1e9)

    # units as ncu scales them by default (no --print-units base): read the same
    scaled = _csv([_row(0, C.MARKER, "1.5"), _row(1, "k", "15.25", "44", {"dram__bytes_read.sum": "29.36",
                                                                           "smsp__inst_executed.sum": "1.5"})],
                  units=["usecond", "%", "Mbyte", "Kinst"] + UNITS[4:], noise=False)
    k = C.attribute(C.read_raw_csv(scaled), cases[:1])["cases"][0]["kernels"][0]
    assert k["duration_us"] == pytest.approx(15.25) and k["dram_read_bytes"] == pytest.approx(29.36e6)
    assert k["warp_instructions"] == pytest.approx(1500)


def test_the_details_page_layout_is_read_too():
    """An ncu that wrote the details page's layout (a row per metric, display names) instead of the raw page's."""
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Section Name","Metric Name","Metric Unit","Metric Value"'
    rows = [(0, C.MARKER, "GPU Speed Of Light Throughput", "Duration", "usecond", "1.50"),
            (1, "gemv(half*)", "GPU Speed Of Light Throughput", "Duration", "usecond", "15.25"),
            (1, "gemv(half*)", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "44.50"),
            (1, "gemv(half*)", "Occupancy", "Achieved Occupancy", "%", "61.20"),
            (1, "gemv(half*)", "Occupancy", "Block Limit Registers", "block", "6"),
            (1, "gemv(half*)", "Occupancy", "Block Limit Warps", "block", "16"),
            (1, "gemv(half*)", "Launch Statistics", "Dynamic Shared Memory Per Block", "Kbyte/block", "2.05")]
    text = "\n".join(["==PROF== Disconnected", head] + [
        f'"{i}","9","python3","h","{k}","1","7","{sec}","{name}","{unit}","{val}"' for i, k, sec, name, unit, val in rows])
    att = C.attribute(C.read_raw_csv(text), [{"n": 1, "k": 1, "m": 1, "backend": "w4a16-cuda"}])
    k = att["cases"][0]["kernels"][0]
    assert k["kernel"] == "gemv(half*)" and k["duration_us"] == pytest.approx(15.25) and k["dram_pct"] == pytest.approx(44.5)
    assert k["occupancy_pct"] == pytest.approx(61.2) and k["occupancy_limited_by"] == ["registers"]
    assert k["smem_dynamic_bytes"] == pytest.approx(2050)


def test_extra_counters_only_where_ncu_lists_them(tmp_path):
    ncu = _fake_ncu(tmp_path)
    assert C.known_metrics(ncu) == ["dram__bytes_read.sum", "smsp__inst_executed.sum"]
    assert C.known_metrics(str(tmp_path / "missing-ncu")) == []  # the query fails: no extras, the sections still run
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho dram__bytes_read; exit 3\n")
    failing.chmod(0o755)
    assert C.known_metrics(str(failing)) == []


def test_markers_that_do_not_match_the_cases_attribute_nothing():
    """One marker for two cases (a case's marker lost): every kernel stays unattributed - none is given to the
    wrong case - and the result says why."""
    rows = C.read_raw_csv(_csv([_row(0, C.MARKER, "1"), _row(1, "a", "10"), _row(2, "b", "20")]))
    att = C.attribute(rows, [{"n": 1, "k": 1, "m": 1, "backend": "fp16"}, {"n": 1, "k": 1, "m": 1, "backend": "w4a16-triton"}])
    assert "1 marker kernel(s)" in att["warning"] and len(att["unattributed"]) == 3
    assert all(c["kernels"] == [] for c in att["cases"])
    assert C.read_raw_csv("==PROF== nothing profiled\n") == []


def test_the_child_profiles_each_case_once_after_its_marker():
    """run_cases on the CPU (the interpreter), with stand-ins for cudaProfilerStart / Stop and the marker: each
    case checked against the reference and warmed before its range opens, its range holding the marker and one
    call; a backend that cannot run (the CUDA extension here) is an error entry with no range; past the budget
    no case starts."""
    events = []
    cases = [{"n": 48, "k": 256, "m": 1, "backend": "w4a16-triton"}, {"n": 48, "k": 256, "m": 1, "backend": "w4a16-cuda"},
             {"n": 48, "k": 256, "m": 3, "backend": "fp16"}]
    saved = []
    ran = C.run_cases(cases, torch.device("cpu"), torch.float16, 128, None, start=lambda: events.append("start"),
                      stop=lambda: events.append("stop"), marker=lambda: events.append("marker"),
                      sync=lambda: events.append("sync"), warmup=2, on_case=lambda r: saved.append(len(r["cases"])))
    assert [c["backend"] for c in ran["cases"]] == ["w4a16-triton", "fp16"]
    assert ran["cases"][0]["check"] == "ok" and ran["cases"][1]["check"] == "unchecked"
    assert ran["cases"][0]["bytes"] == 48 * 256 // 2 + 2 * 48 * 2 * 2 + 256 * 2 + 48 * 2  # weights, scales, zeros, x, y
    assert len(ran["errors"]) == 1 and ran["errors"][0]["case"]["backend"] == "w4a16-cuda"
    assert events == ["sync", "start", "marker", "sync", "stop"] * 2 and saved == [1, 2]
    ran = C.run_cases(cases, torch.device("cpu"), torch.float16, 128, -1, start=None, stop=None, marker=None, sync=None)
    assert ran == {"cases": [], "errors": [], "left_out": 3}

    # a call that fails inside its range: the range is closed, the case listed with its error (its marker was
    # launched: the markers and the cases still pair up), and the next case runs
    events.clear()
    calls = {"n": 0}

    def failing_sync():
        calls["n"] += 1
        events.append("sync")
        if calls["n"] == 2:  # the first case's sync inside its range
            raise RuntimeError("illegal memory access")

    ran = C.run_cases(cases[:1] + cases[2:], torch.device("cpu"), torch.float16, 128, None,
                      start=lambda: events.append("start"), stop=lambda: events.append("stop"),
                      marker=lambda: events.append("marker"), sync=failing_sync, warmup=1)
    assert [c.get("error") for c in ran["cases"]] == ["RuntimeError: illegal memory access", None]
    assert ran["errors"] == [{"case": cases[0], "error": "RuntimeError: illegal memory access"}]
    assert events == ["sync", "start", "marker", "sync", "stop"] * 2


QUERY = """Device NVIDIA H200 (GH100)
------------------------------------------------
Metric Name                 Metric Description
dram__bytes_read            # of bytes read from DRAM
smsp__inst_executed         # of warp instructions executed
"""


def _fake_ncu(tmp_path, mode="ok", csv_text=""):
    """A stand-in ncu: `--query-metrics` prints QUERY (it knows two of EXTRA_METRICS); otherwise it reads the
    child's arguments off its command line, writes the manifest the child would (case i: 1000 (i + 1) bytes) and
    copies `csv_text` where ncu writes its CSV. Mode "old" rejects --print-units as an ncu without it would,
    "broken" profiles nothing."""
    (tmp_path / "canned.csv").write_text(csv_text)
    (tmp_path / "query.txt").write_text(QUERY)
    script = tmp_path / "ncu"
    script.write_text(f"""#!{sys.executable}
import json, shutil, sys
a = sys.argv[1:]
if a == ["--query-metrics"]:
    print(open({str(tmp_path / "query.txt")!r}).read()); sys.exit(0)
if {mode!r} == "old" and "--print-units" in a:
    print("==ERROR== unrecognised option '--print-units'"); sys.exit(1)
log = a[a.index("--log-file") + 1]
cases = json.load(open(a[a.index("--cases-json") + 1]))
ran = [dict(c, bytes=1000 * (i + 1), check="ok") for i, c in enumerate(cases)]
json.dump(dict({{"cases": ran, "errors": []}}, **({{"left_out": 1}} if {mode!r} == "short" else {{}})),
          open(a[a.index("--manifest") + 1], "w"))
if {mode!r} == "broken":
    open(log, "w").write("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters\\n")
    sys.exit(1)
shutil.copy({str(tmp_path / "canned.csv")!r}, log)
""")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("mode", ["ok", "old", "short"])
def test_run_counters_end_to_end_with_a_stand_in_ncu(tmp_path, monkeypatch, mode):
    import minicpm_int4.bench.env as env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env, "env_info", lambda device: dict(ENV))
    cases = C.parse_cases("64:128:1:fp16,64:128:1:w4a16-cuda")
    extra = {"dram__bytes_read.sum": "1,500", "smsp__inst_executed.sum": "1,024"}
    text = _csv([_row(0, C.MARKER, "100"), _row(1, "kernel_fp16", "1,000", "55", extra),
                 _row(2, C.MARKER, "100"), _row(3, "kernel_w4a16-cuda", "2,000", "55", extra)])
    res = C.run_counters(str(tmp_path / "out"), cases, time_budget_s=5, ncu=_fake_ncu(tmp_path, mode, text))
    assert "error" not in res, res.get("error")
    assert ("--print-units" in res["command"]) == (mode != "old")  # retried without it where ncu lacks it
    # a child that ran out of its budget says so (the cases it left out); a finished one is not "incomplete"
    assert res.get("incomplete") == ("1 of 2 cases left out (time budget of 5 s)" if mode == "short" else None)
    # the extra counters this ncu lists (lts__t_bytes is not in its list: left out, not failing the run)
    assert res["extra_metrics"] == ["dram__bytes_read.sum", "smsp__inst_executed.sum"]
    assert "--metrics dram__bytes_read.sum,smsp__inst_executed.sum" in res["command"]
    assert [[k["kernel"] for k in c["kernels"]] for c in res["cases"]] == [["kernel_fp16"], ["kernel_w4a16-cuda"]]
    assert [c["kernels"][0]["duration_us"] for c in res["cases"]] == [1.0, 2.0]
    ours = res["cases"][1]
    assert ours["gbps"] == pytest.approx(2000 / 2e-6 / 1e9) and ours["dram_read_over_bytes"] == pytest.approx(0.75)
    assert ours["thread_inst_per_weight"] == pytest.approx(1024 * 32 / (64 * 128)) and "l2_over_bytes" not in ours
    saved = json.loads((tmp_path / "out" / "counters.json").read_text())
    assert saved["env"]["device_name"] == "NVIDIA H200" and len(saved["raw"]) == 4
    md = (tmp_path / "out" / "counters.md").read_text()
    assert "| 64 x 128 | 1 | w4a16-cuda | `kernel_w4a16-cuda` | 2.00 | 1 | 0.75 | - | 4.00 | 55 |" in md and "NVIDIA H200" in md


def test_run_counters_says_why_it_has_no_numbers(tmp_path, monkeypatch):
    import minicpm_int4.bench.env as env

    monkeypatch.setattr(C, "find_ncu", lambda: None)
    res = C.run_counters(str(tmp_path / "a"), C.parse_cases("64:64:1:fp16"))
    assert "ncu (Nsight Compute) not found" in res["skipped"]
    assert "skipped: ncu" in (tmp_path / "a" / "counters.md").read_text()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env, "env_info", lambda device: dict(ENV))
    res = C.run_counters(str(tmp_path / "b"), C.parse_cases("64:64:1:fp16"), time_budget_s=5,
                         ncu=_fake_ncu(tmp_path, "broken"))
    assert "ERR_NVGPUCTRPERM" in res["error"] and "ERR_NVGPUCTRPERM" in (tmp_path / "b" / "counters.md").read_text()

    with pytest.raises(ValueError, match="unknown backend"):  # before ncu starts
        C.run_counters(str(tmp_path / "c"), C.parse_cases("64:64:1:w4a16-fast"), ncu="/nonexistent")


@pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
def test_the_child_refuses_to_run_without_a_gpu(tmp_path, capsys):
    assert C.main(["--child", "--cases-json", str(tmp_path / "c.json"), "--manifest", str(tmp_path / "m.json"),
                   "--deadline", "0"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_script_refuses_a_bad_case_list(capsys):
    with pytest.raises(SystemExit):
        C.main(["--out", "x", "--cases", "1:2:fp16"])
    assert "N:K:M:backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        C.main([])
    assert "--out is required" in capsys.readouterr().err


def test_run_streaming_prints_as_it_goes_and_kills_the_whole_session(capsys):
    """ncu's output goes through line by line (the progress of a minute-long run); past the timeout the whole
    session goes - a profiled child that outlived ncu would hold the pipe open (and, on a GPU, the device)."""
    import time

    rc, out = C.run_streaming([sys.executable, "-c", "print('one'); print('two'); raise SystemExit(3)"], 60)
    assert rc == 3 and out == "one\ntwo\n" and capsys.readouterr().out == "one\ntwo\n"
    t0 = time.monotonic()
    rc, out = C.run_streaming(["sh", "-c", "echo started; sleep 60 & sleep 60"], 1.5, echo=False)
    assert rc == "timeout" and out == "started\n" and time.monotonic() - t0 < 30
    assert capsys.readouterr().out == ""


def test_the_cli_runs_it(capsys):
    from minicpm_int4.cli import main

    with pytest.raises(SystemExit):
        main(["counters", "--help"])
    out = capsys.readouterr().out
    assert "minicpm-int4 counters" in out and "--time-budget-s" in out
    with pytest.raises(SystemExit):
        main(["counters", "--out", "x", "--cases", "1:2:fp16"])
    assert "N:K:M:backend" in capsys.readouterr().err


def test_the_wrapper_script_runs_the_module():
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(here, "benchmarks", "ncu_counters.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--time-budget-s" in r.stdout and "Hardware counters" in r.stdout
