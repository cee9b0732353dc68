"""backend="auto" on CUDA: a measured table decides between the Triton kernel and the CUDA extension."""
import json

from minicpm_int4.dispatch import m_bucket, table_from_bench, w4a16_auto_backend


def _bench(device_name, rows):
    return {"env": {"device_name": device_name, "commit": "abc", "timestamp_utc": "t"},
            "rows": [dict(r, check="ok") for r in rows]}


def test_table_records_only_measured_wins_and_lookup_uses_it(tmp_path):
    rows = [
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-triton", "median_ms": 0.010},
        {"n": 4096, "k": 4096, "m": 1, "backend": "w4a16-cuda", "median_ms": 0.008},   # cuda wins
        {"n": 4096, "k": 4096, "m": 16, "backend": "w4a16-triton", "median_ms": 0.012},
        {"n": 4096, "k": 4096, "m": 16, "backend": "w4a16-cuda", "median_ms": 0.020},  # triton wins
        {"n": 1024, "k": 4096, "m": 2, "backend": "w4a16-cuda", "median_ms": 0.001},   # no triton row: no claim
    ]
    table = table_from_bench(_bench("GPU-A", rows))
    assert table["devices"]["GPU-A"]["w4a16"] == [
        {"n": 4096, "k": 4096, "m": 1, "backend": "cuda", "cuda_ms": 0.008, "triton_ms": 0.010}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    pick = lambda m, n, k, dev="GPU-A": w4a16_auto_backend(m, n, k, 0, True, str(path), dev)  # noqa: E731
    assert pick(1, 4096, 4096) == "cuda"
    assert pick(16, 4096, 4096) == "triton"
    assert pick(9, 4096, 4096) == "triton"          # bucket 16, measured slower
    assert pick(1, 4096, 4096, "GPU-B") == "triton"  # another GPU: nothing measured, nothing guessed
    assert pick(1, 4096, 8192) == "triton"           # unmeasured shape
    assert pick(64, 4096, 4096) == "triton"          # beyond the CUDA kernel's range
    assert w4a16_auto_backend(1, 4096, 4096, 0, False, str(path), "GPU-A") == "triton"  # extension not built


def test_tables_merge_per_device():
    a = table_from_bench(_bench("GPU-A", []))
    b = table_from_bench(_bench("GPU-B", []), a)
    assert set(b["devices"]) == {"GPU-A", "GPU-B"}


def test_m_buckets():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]


def test_no_table_is_shipped_until_measured():
    # the committed package must not carry an unmeasured dispatch table
    import os
    from minicpm_int4.dispatch import TABLE_PATH
    if os.path.exists(TABLE_PATH):
        t = json.load(open(TABLE_PATH))
        for dev, entry in t["devices"].items():
            assert entry["commit"] and entry["timestamp_utc"], dev
