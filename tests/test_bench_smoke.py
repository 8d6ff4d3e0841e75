"""Smoke test of scripts/bench.py (shape of its JSON, no timing assertions) and of the
synthetic table generator scripts/gen_kallsyms.py it feeds on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksymsfs.kallsyms import parse_kallsyms
from ksymsfs.sources import parse_modules
from tests.fuse_harness import require_fuse
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))

import gen_kallsyms  # noqa: E402


def _positive(d: dict, *keys: str) -> None:
    for k in keys:
        v = d[k]
        if isinstance(v, dict):
            v = v["median"]
        assert isinstance(v, (int, float)) and v > 0, (k, v)


def _run_bench(out: Path, *extra: str, timeout: float) -> tuple[dict, str]:
    # ``timeout`` only catches a hang: a --quick --no-fuse run takes ~12 s here, and a
    # loaded 2-core CI machine (or a bare Debian root) may be several times slower
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
                        "--json", str(out), *extra], cwd=str(REPO),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text()), r.stdout


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> dict:
    data, stdout = _run_bench(tmp_path_factory.mktemp("bench") / "bench.json", "--no-fuse",
                              timeout=300)
    assert "SKIPPED: --no-fuse given" in stdout
    return data


@pytest.fixture(scope="module")
def bench_fuse_json(tmp_path_factory) -> dict:
    """--quick with the FUSE sections: a live mount and a captured-kallsyms mount."""
    require_fuse()
    data, stdout = _run_bench(tmp_path_factory.mktemp("bench-fuse") / "bench.json",
                              timeout=300)
    assert "SKIPPED" not in stdout, stdout
    return data


def test_bench_fuse_sections(bench_fuse_json):
    live = bench_fuse_json["live"]["fuse"]
    assert not live["skipped"]
    _positive(live, "cat_mount_s", "read_mount_s", "ratio_cat", "mount_bytes",
              "cat_kallsyms_s", "cat_local_copy_s", "cat_sparse_tmpfs_s", "cat_dev_null_s",
              "ratio_floor")
    co = live["colocated"]  # a sleeper per CPU while the mount is read, and kallsyms
    for k in ("mount", "kallsyms"):
        assert co[k]["wakeups"] > 10 and 0 < co[k]["p999_s"] <= co[k]["worst_s"] < 10, co
        assert 0 <= co[k]["over_10ms"] <= co[k]["wakeups"]
    assert co["ratio"] == pytest.approx(co["mount"]["p999_s"] / co["kallsyms"]["p999_s"])
    for tool in ("nm", "readelf"):
        t = bench_fuse_json["tools"][tool]
        assert t["same_output"] is True          # the mount and the local copy agree
        _positive(t, "mount_s", "local_s", "ratio", "floor_s", "captured_mount_s",
                  "captured_ratio")
    small = bench_fuse_json["tools"]["small_reads"]
    assert small["symbols"] > 0
    _positive(small, "mount_s", "local_s", "ratio")
    conc = bench_fuse_json["concurrency"]
    assert conc["daemon_idle_rss"] > 0
    assert conc["captured"][-1]["vs_local"] > 0
    assert [lv["processes"] for lv in conc["levels"]] == [1, 4]
    assert all(lv["all_ok"] and not lv["errors"] for lv in conc["levels"])
    _positive(conc["levels"][-1], "floor_s", "wall_vs_floor", "serial_floor_s",
              "wall_vs_serial_floor", "sparse_tmpfs_wall_s")  # one / two kallsyms reads
    lv = conc["levels"][-1]  # + the copies: page-cached ones, as the default mount serves
    assert lv["floor_copy"] == live["floor_copy"] == "page-cached"
    assert lv["floor_s"] - lv["local_wall_s"] > 0
    for lv in conc["levels"]:  # the machine's CPUs over a wave, and the daemon's part
        assert 0 < lv["cpu_busy_share"] <= 1.0 and lv["cpu_busy_s"] > 0, lv
        # every wave's open reads kallsyms in the daemon (the kernel's ~20+ ms of work)
        assert 0 < lv["daemon_cpu_s"] <= lv["cpu_busy_s"] * 1.1, lv
        assert lv["readers_cpu_s"] > 0 and lv["bench_cpu_s"] > 0, lv  # dd's, our Popen
        assert 0 < lv["spawn_s"] < max(lv["wall_s"]["runs"]), lv  # their starts, in a wave
    assert [c["processes"] for c in conc["captured"]] == [1, 4]
    for c in conc["captured"]:
        _positive(c, "wall_s", "wall_ratio")
    # the rows whose floor (the same work with no daemon) can exceed their target say so
    checks = {c["name"]: c for c in bench_fuse_json["checks"]}
    for name in ("live_open_read", "concurrent_wall"):
        c = checks[name]
        assert c["floor"] > 0, c
        assert c["floor_above_target"] is (c["floor"] > c["target"])
    # live: (kallsyms + the page-cached copy: the default mount serves every byte through
    # FUSE's page cache, zeros too) / kallsyms; crowd: (one kallsyms read + N page-cached
    # copies) / one reader of the mount (which can be under 1: N copies on several cores)
    assert checks["live_open_read"]["floor"] == pytest.approx(_live_floor(live, "cat_local_copy_s"))
    copies = bench_fuse_json["meta"]["tmpfs_copies"]  # its sparse copies: made, then gone
    assert len(copies) >= 2 and not [p for p in copies if os.path.exists(p)], copies
    assert checks["concurrent_wall"]["floor"] == pytest.approx(
        conc["levels"][-1]["floor_s"] / conc["levels"][0]["wall_s"]["median"])


def test_bench_passthrough_sections(bench_fuse_json):
    """The FUSE rows again on --passthrough mounts that really use it, checked against
    the same targets under their own names."""
    pt = bench_fuse_json["passthrough"]
    assert pt["skipped"] is None and pt["active"] is True
    _positive(pt["live"]["fuse"], "cat_mount_s", "ratio_cat", "ratio_floor")
    assert pt["tools"]["nm"]["same_output"] is True
    assert all(lv["all_ok"] for lv in pt["concurrency"]["levels"])
    assert pt["concurrency"]["captured"][-1]["vs_local"] > 0
    names = {c["name"] for c in bench_fuse_json["checks"]}
    for name in ("live_open_read", "nm_mount_vs_local", "concurrent_wall",
                 "crowd_vs_local", "colocated_wakeup"):
        assert name in names and f"{name}_passthrough" in names
    # its floors read the sparse copy, as the kernel reads its memory files' holes
    live, lv = pt["live"]["fuse"], pt["concurrency"]["levels"][-1]
    assert live["floor_copy"] == lv["floor_copy"] == "sparse tmpfs"
    checks = {c["name"]: c for c in bench_fuse_json["checks"]}
    assert checks["live_open_read_passthrough"]["floor"] == pytest.approx(
        _live_floor(live, "cat_sparse_tmpfs_s"))
    assert lv["floor_s"] - lv["sparse_tmpfs_wall_s"] > 0


def _live_floor(live: dict, copy: str) -> float:
    """(cat kallsyms + the ``copy`` row's cat beyond a cat's own start) / cat kallsyms."""
    beyond = max(0.0, live[copy]["median"] - live["cat_dev_null_s"]["median"])
    return 1 + beyond / live["cat_kallsyms_s"]["median"]


def test_bench_sections_present(bench_json):
    for key in ("meta", "live", "tools", "scaling", "concurrency", "lookup", "checks"):
        assert key in bench_json
    assert bench_json["meta"]["quick"] is True
    assert bench_json["meta"]["repeat"] >= 1
    # the FUSE sections say why they were skipped; so does the VM guest row without figures
    assert bench_json["tools"]["skipped"]
    assert bench_json["live"]["vm_guest"]["skipped"]
    assert bench_json["concurrency"]["skipped"]


def test_bench_live_section(bench_json):
    live = bench_json["live"]
    if live["skipped"]:
        pytest.skip(f"live section skipped: {live['skipped']}")
    _positive(live, "cat_s", "read_s", "make_image_s", "image_bytes", "kallsyms_lines")
    assert live["fuse"]["skipped"]


def test_bench_scaling_section(bench_json):
    sizes = bench_json["scaling"]["sizes"]
    assert len(sizes) >= 2
    assert [s["symbols"] for s in sizes] == sorted(s["symbols"] for s in sizes)
    for s in sizes:
        _positive(s, "symbols", "input_bytes", "image_bytes", "build_s", "read_s",
                  "snapshot_s", "peak_rss_bytes", "rss_per_image", "build_per_read")
        assert len(s["build_s"]["runs"]) == bench_json["meta"]["repeat"]
    lin = bench_json["scaling"]["linearity"]
    _positive(lin, "time_ratio", "symbol_ratio")
    # paired rounds: each round's ratio from its own two processes, the figure their median
    assert len(lin["rounds"]) == 5
    for r in lin["rounds"]:
        assert r["ratio"] == r["big_build_s"]["median"] / r["small_build_s"]["median"]
        # as many builds of each size: a process's first (slower) build weighs the same
        assert len(r["big_build_s"]["runs"]) == len(r["small_build_s"]["runs"]) \
            == bench_json["meta"]["repeat"]
    assert lin["time_ratio"] == sorted(r["ratio"] for r in lin["rounds"])[2]


def test_bench_lookup_section(bench_json):
    lk = bench_json["lookup"]
    assert not lk["skipped"]
    _positive(lk, "nlist_bytes_ms", "nlist_parsed_ms", "lookup_bytes_ms", "parse_image_ms",
              "strtab_scan_ms")
    assert len(lk["names"]) == 10 and len(lk["addresses"]) == 10
    assert lk["names_found"] == 9       # nine picked from the table, one made up
    assert lk["addresses_resolved"] >= 1


def test_bench_checks(bench_json):
    assert bench_json["checks"]
    for c in bench_json["checks"]:
        assert set(c) >= {"name", "value", "target", "passed"}
        assert c["passed"] in (True, False, None)
        assert c["target"] >= 0


def test_bench_reports_vm_guest_figures(tmp_path):
    vm = tmp_path / "vm.json"
    vm.write_text(json.dumps({"guest_open_read_s": 0.6, "guest_cat_s": 0.4,
                              "guest_local_s": 0.1}))
    data, stdout = _run_bench(tmp_path / "b.json", "--no-fuse", "--sizes", "3000,10000",
                              "--vm-json", str(vm), timeout=300)
    g = data["live"]["vm_guest"]
    assert g["skipped"] is None and abs(g["ratio"] - 1.5) < 1e-9
    assert abs(g["ratio_floor"] - 1.2) < 1e-9  # 0.6 / (0.4 + 0.1)
    assert "VM guest: cat MOUNT" in stdout and "MOUNT vs its floor" in stdout
    row = next(x for x in stdout.splitlines() if "VM guest: cat MOUNT" in x)
    assert "(report)" in row and "PASS" not in row and "FAIL" not in row
    assert not any(c["name"].startswith("vm_guest") for c in data["checks"])


def test_generator_is_realistic_and_deterministic():
    ks, mods = gen_kallsyms.generate(20000, 12, 64, seed=5)
    assert (ks, mods) == gen_kallsyms.generate(20000, 12, 64, seed=5)
    assert ks != gen_kallsyms.generate(20000, 12, 64, seed=6)[0]
    table = parse_kallsyms(ks, "gen")          # strict: every line well-formed
    assert len(table) == 20000 and table.address_bits == 64
    listed = parse_modules(mods, "gen-modules")
    assert len(listed) == 12
    # kallsyms: modules newest first, in /proc/modules order; pseudo-modules after them
    seen = list(dict.fromkeys(table.modules[i] for i in table.module.tolist() if i))
    assert seen[:12] == [m.name for m in listed]
    assert seen[12:] == ["__builtin__ftrace", "bpf"]
    kern = table.addr[table.module == 0]
    assert (kern[1:] >= kern[:-1]).all()       # core kernel sorted by address
    for m in listed:
        a = table.addr[table.module == table.modules.index(m.name)]
        assert m.address == int(a.min()) >= 0xFFFFFFFFC0000000
        assert int(a.max()) < m.address + m.size
    letters = {chr(c) for c in table.letter.tolist()}
    assert {"t", "T", "r", "d", "b"} <= letters
    names = [table.name(i) for i in range(len(table))]
    assert len(set(names)) < len(names)        # duplicate static names exist
    assert 5 <= min(map(len, names)) and max(map(len, names)) <= 200


def test_generator_32bit():
    ks, _ = gen_kallsyms.generate(2000, 3, 32, seed=1)
    table = parse_kallsyms(ks, "gen32")
    assert table.address_bits == 32
