"""The scenario run inside the guest (root, live Debian kernel): checks -> OUT/results.json."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ksymsfs import KIOCGSIZE  # noqa: E402
from tests.vm import churn, images  # noqa: E402
from tests.vm import kernel_ops as ko  # noqa: E402

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/out")
CONFIG = json.loads((OUT / "config.json").read_text()) if (OUT / "config.json").exists() else {}
MODROOT = CONFIG.get("modroot", "/")
EXTRA_MODULES = ["fuse", "dummy", "bridge", "veth", "tun", "vxlan"]


class Results:
    """Named checks (ok + detail) and figures, written to OUT/results.json after each step."""

    def __init__(self) -> None:
        self.data: dict = {"checks": {}, "figures": {}, "log": []}

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.data["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"ksymsfs-vm: check {name}: {'ok' if ok else 'FAIL'} {str(detail)[:300]}",
              flush=True)
        self.save()
        return ok

    def figure(self, name: str, value: object) -> None:
        self.data["figures"][name] = value
        self.save()

    def log(self, msg: str) -> None:
        print(f"ksymsfs-vm: {msg}", flush=True)
        self.data["log"].append(msg)

    def save(self) -> None:
        tmp = OUT / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, OUT / "results.json")


RES = Results()


def step(name: str):
    """Run one scenario step; an exception fails check ``name`` and the scenario goes on."""
    def wrap(fn):
        def run(*a, **kw):
            t = time.monotonic()
            try:
                return fn(*a, **kw)
            except Exception:
                RES.check(name, False, traceback.format_exc()[-2000:])
            finally:
                RES.log(f"step {name}: {time.monotonic() - t:.1f} s")
        return run
    return wrap


@step("setup")
def setup() -> dict:
    for m in EXTRA_MODULES:
        r = ko.modprobe(MODROOT, m)
        if r.returncode:
            RES.log(f"modprobe {m}: {r.stderr.strip()}")
    fd = ko.bpf_load_trivial()
    off = ko.kprobe_add("vfs_read")
    ko.function_tracer(True)
    text = Path("/proc/kallsyms").read_text()
    mods = {line.split("\t[")[1].rstrip("]") for line in text.splitlines() if "\t[" in line}
    pseudo = sorted(m for m in mods if m == "bpf" or m.startswith("__builtin__"))
    RES.check("setup", {"bpf", "__builtin__kprobes", "__builtin__ftrace"} <= set(pseudo),
            {"modules": len(mods), "pseudo": pseudo, "kprobe_offset": off})
    return {"bpf_fd": fd, "kprobe_offset": off}


@step("capture")
def capture() -> None:
    d = OUT / "dump"
    shutil.rmtree(d, ignore_errors=True)
    (d / "sections").mkdir(parents=True)
    shutil.copyfile("/proc/kallsyms", d / "kallsyms")
    shutil.copyfile("/proc/modules", d / "modules")
    for m in sorted(os.listdir("/sys/module")):
        s = Path("/sys/module", m, "sections")
        if s.is_dir():
            (d / "sections" / m).mkdir()
            for f in sorted(os.listdir(s)):
                (d / "sections" / m / f).write_bytes((s / f).read_bytes())
    RES.check("capture", True, str(d))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "ksymsfs", *args], capture_output=True,
                       env=env, timeout=300)
    if r.returncode:
        raise RuntimeError(f"ksymsfs {' '.join(args)}: exit {r.returncode}: {r.stderr[-500:]}")
    return r


def kallsyms_lines() -> list[str]:
    return Path("/proc/kallsyms").read_text(errors="surrogateescape").splitlines()


def diff(want: list[str], got: list[str]) -> dict:
    missing, extra = Counter(want) - Counter(got), Counter(got) - Counter(want)
    return {"lines": len(want), "missing": sum(missing.values()), "extra": sum(extra.values()),
            "missing_sample": list(missing)[:5], "extra_sample": list(extra)[:5]}


@step("snapshot")
def snapshot_checks() -> None:
    """``ksymsfs snapshot`` in the guest; the host compares it with the kallsyms saved here
    (dump lines, nm letters, tool warnings: tests/vm/test_vm.py, natively, not under TCG)."""
    img = OUT / "snap.elf"
    for _ in range(3):   # quiet kernel: the same text before and after
        before = Path("/proc/kallsyms").read_bytes()
        cli("snapshot", "-o", str(img))
        if Path("/proc/kallsyms").read_bytes() == before:
            break
    (OUT / "snap.kallsyms").write_bytes(before)
    RES.check("snapshot", img.stat().st_size > 0, {"bytes": img.stat().st_size})
    sections_check(str(img))


def sections_check(img: str) -> None:
    from ksymsfs.reader import parse_image
    names = parse_image(img).section_names
    per_mod: dict[str, set[str]] = {}
    for n in names:
        if n.endswith("]") and "[" in n:
            sec, mod = n[:-1].split("[", 1)
            per_mod.setdefault(mod, set()).add(sec)
    unknown, named, total = {}, 0, 0
    for mod, secs in per_mod.items():
        sysfs = Path("/sys/module", mod, "sections")
        real = set(os.listdir(sysfs)) if sysfs.is_dir() else set()
        total += len(real)
        # a second run of symbols inside one real section is named "<section>.N" (section
        # names are kept unique: layout.unique_names)
        secs = {re.sub(r"\.\d+$", "", x) if re.sub(r"\.\d+$", "", x) in real else x
                for x in secs}
        named += len(secs & real)
        if real and secs - real:
            unknown[mod] = sorted(secs - real)
    RES.check("sysmodule_sections", not unknown and named > 0,
            {"modules": len(per_mod), "image_sections_named": named,
             "sysfs_sections": total, "not_in_sysfs": unknown})


class Mounted:
    """``ksymsfs mount -f`` of the live kernel at a file path, in a child process."""

    def __init__(self, path: str = "/tmp/ksyms", *args: str, others: bool = True) -> None:
        self.path, self.log = path, path + ".log"
        Path(path).touch()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.p = subprocess.Popen([sys.executable, "-m", "ksymsfs", "mount", "-f",
                                   *(["--allow-other"] if others else []), *args, path],
                                  env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        for _ in range(600):
            if any(ln.split()[4] == path for ln in open("/proc/self/mountinfo")):
                return
            if self.p.poll() is not None:
                raise RuntimeError("mount exited: " + open(self.log).read()[-500:])
            time.sleep(0.1)
        raise RuntimeError("mount did not appear in 60 s")

    def close(self) -> None:
        subprocess.run(["fusermount", "-u", self.path], capture_output=True)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()


def image_lines(data: bytes) -> list[str]:
    from ksymsfs.reader import dump_lines, parse_image
    return list(dump_lines(parse_image(data)))


@step("mount_lines")
def mount_checks(m: Mounted) -> None:
    for _ in range(3):
        before = kallsyms_lines()
        with open(m.path, "rb") as f:
            data = f.read()
        if kallsyms_lines() == before:
            break
    want = images.from_lines(before)
    got = images.from_bytes(data)
    # the same symbols in the same order (fast); else the full line diff says what differs
    d = {"lines": len(before), "missing": 0, "extra": 0} if got.key() == want.key() else \
        diff(before, image_lines(data))
    RES.check("mount_lines", d["missing"] == d["extra"] == 0, d)
    (OUT / "mount.elf").write_bytes(data)


@step("open_latency")
def open_latency(m: Mounted, runs: int = 5) -> None:
    """The guest's own figure for scripts/bench.py (--vm-json): median wall time of a whole
    read of the mount (open + read + close) vs one of /proc/kallsyms and one of a tmpfs
    copy of the image (the floor's other half: the bytes every reader copies), interleaved."""
    mount_s, cat_s, local_s, sizes = [], [], [], set()
    copy = Path("/tmp/latency-copy.elf")  # tmpfs: the same bytes, read the same way
    with open(m.path, "rb") as f:
        copy.write_bytes(f.read())
    for _ in range(runs):
        t = time.perf_counter()
        with open(m.path, "rb") as f:
            n = len(f.read())
            want = os.fstat(f.fileno()).st_size
        mount_s.append(time.perf_counter() - t)
        sizes.add(n == want)
        t = time.perf_counter()
        with open("/proc/kallsyms", "rb") as f:
            f.read()
        cat_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        with open(copy, "rb") as f:
            f.read()
        local_s.append(time.perf_counter() - t)
    copy.unlink()
    fig = {"guest_open_read_s": statistics.median(mount_s),
           "guest_cat_s": statistics.median(cat_s),
           "guest_local_s": statistics.median(local_s), "runs": runs}
    fig["ratio"] = fig["guest_open_read_s"] / fig["guest_cat_s"]
    RES.figure("open_latency", fig)
    (OUT / "bench-vm.json").write_text(json.dumps(fig))
    RES.check("open_latency", sizes == {True} and all(x > 0 for x in mount_s + cat_s), fig)


def image_modules(data: bytes) -> set[str]:
    from ksymsfs.reader import parse_image
    img = parse_image(data)
    return {img.modname(int(k)) for k in np.unique(img.modkey)}


def held_view(f) -> dict:
    f.seek(0)
    data = f.read()
    st = os.fstat(f.fileno()).st_size
    buf = bytearray(8)
    fcntl.ioctl(f.fileno(), KIOCGSIZE, buf)
    return {"read": len(data), "fstat": st, "kiocgsize": struct.unpack("<Q", buf)[0],
            "data": data}


@step("passthrough_falls_back")
def passthrough_fallback(m: Mounted) -> None:
    """--passthrough on a kernel without it (6.1): said in the log, and the mount serves
    the same snapshot through the page cache."""
    pt = Mounted("/tmp/ksyms-pt", "--passthrough", others=False)  # (refused together)
    try:
        with open(pt.path, "rb") as f:
            data = f.read()
        with open(m.path, "rb") as f:
            want = f.read()
        log = open(pt.log).read()
        same = images.from_bytes(data).key() == images.from_bytes(want).key()
        RES.check("passthrough_falls_back", "not offered by this kernel" in log and same,
                  {"log": log[-300:], "same_symbols": same})
    finally:
        pt.close()


@step("held_fd")
def held_fd_checks(m: Mounted) -> None:
    held = open(m.path, "rb")
    v1 = held_view(held)
    ko.modprobe(MODROOT, "-r", "dummy")
    after_rmmod = as_user(None, open_modules, m.path)  # another process's open: the new state
    r = ko.modprobe(MODROOT, "dummy")
    after_load = as_user(None, open_modules, m.path)
    v2 = held_view(held)
    held.close()
    sizes = {k: v2[k] for k in ("read", "fstat", "kiocgsize")}
    has = {"held_before": "dummy" in image_modules(v1["data"]),
           "held_after": "dummy" in image_modules(v2["data"]),
           "after_rmmod": "dummy" in after_rmmod, "after_modprobe": "dummy" in after_load}
    RES.check("held_fd_keeps_snapshot", v1["data"] == v2["data"] and has["held_after"], has)
    RES.check("held_fd_sizes_agree", len(set(sizes.values())) == 1 or
            (sizes["fstat"] == sizes["kiocgsize"] and sizes["read"] <= sizes["fstat"]
             and not v2["data"][sizes["read"]:].strip(b"\0")), sizes)
    RES.check("next_open_sees_rmmod_modprobe",
            not has["after_rmmod"] and has["after_modprobe"] and r.returncode == 0, has)


def kernel_shows(path: str) -> bool:
    """Some /proc/kallsyms line has a non-zero address."""
    return re.search(rb"^(?!0+ )[0-9a-f]+ ", Path(path).read_bytes(), re.M) is not None


def image_shows(path: str) -> bool:
    """Some symbol of one open of the image has a non-zero address (symbol parts only)."""
    return bool(images.from_image(path).addr.any())


def open_modules(path: str) -> list[str]:
    syms = images.from_image(path)
    return sorted({images.mod_name(int(k)) for k in np.unique(syms.mod)})


def as_user(user: int | None, fn, path: str):
    """``fn(path)`` in a forked child (as uid/gid ``user`` if given): its own process and
    credentials, without starting a program (cheap under TCG); the result comes back as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)
            os.write(w, json.dumps(fn(path)).encode())
        except BaseException:
            os.write(w, json.dumps({"error": traceback.format_exc()[-500:]}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read() or b"null")
    os.waitpid(pid, 0)
    if isinstance(out, dict):
        raise RuntimeError(f"as uid {user}: {fn.__name__}({path}): {out['error']}")
    return out


# (kptr_restrict, perf_event_paranoid, who, uid): each rule of kallsyms_show_value once
POLICY_CASES = [(0, 3, "root", None), (0, 3, "nobody", 65534), (0, 1, "nobody", 65534),
                (1, 3, "root", None), (1, 3, "nobody", 65534), (2, 3, "root", None)]


@step("policy")
def policy_checks(m: Mounted) -> None:
    sysk = Path("/proc/sys/kernel")
    saved = {k: (sysk / k).read_text() for k in ("kptr_restrict", "perf_event_paranoid")}
    rows, ok = [], True
    try:
        for kptr, paranoid, who, uid in POLICY_CASES:
            (sysk / "kptr_restrict").write_text(f"{kptr}\n")
            (sysk / "perf_event_paranoid").write_text(f"{paranoid}\n")
            kernel = as_user(uid, kernel_shows, "/proc/kallsyms")
            image = as_user(uid, image_shows, m.path)
            rows.append({"kptr_restrict": kptr, "perf_event_paranoid": paranoid,
                         "user": who, "kernel_shows": kernel, "image_shows": image})
            ok &= kernel == image
    finally:
        for k, v in saved.items():
            (sysk / k).write_text(v)
    RES.check("kptr_restrict_policy", ok, rows)
    nobody = [r for r in rows if r["user"] == "nobody" and r["kptr_restrict"] == 0
              and r["perf_event_paranoid"] == 3]
    RES.check("unprivileged_gets_zeros", nobody and not nobody[0]["image_shows"], nobody)


def profile_one_open(path: str) -> None:
    """cProfile of one open through the mount and one direct snapshot -> OUT/profile.txt."""
    import cProfile
    import io
    import pstats
    out = io.StringIO()
    for what, fn in (("mount open + symbol parts", lambda: churn.take(path, True)),
                     ("direct snapshot", lambda: churn.take(path, False))):
        prof = cProfile.Profile()
        t = time.monotonic()
        prof.runcall(fn)
        out.write(f"== {what}: {time.monotonic() - t:.2f} s\n")
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    (OUT / "profile.txt").write_text(out.getvalue())


def main() -> int:
    t0 = time.monotonic()
    RES.figure("kernel", os.uname().release)
    setup()
    if CONFIG.get("capture"):
        capture()
    if not CONFIG.get("churn_only"):
        snapshot_checks()
    m = Mounted()
    try:
        if not CONFIG.get("churn_only"):
            mount_checks(m)
            open_latency(m)
            passthrough_fallback(m)
            held_fd_checks(m)
            policy_checks(m)
        ko.function_tracer(False)   # everything runs ~10x slower while it traces
        if CONFIG.get("profile"):
            step("profile")(profile_one_open)(m.path)
        churn.run_all(RES, m.path, MODROOT, CONFIG.get("churn", "ci"), step)
    finally:
        m.close()
    RES.figure("scenario_seconds", round(time.monotonic() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
