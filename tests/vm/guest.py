"""The scenario run inside the guest (root, live Debian kernel): checks -> OUT/results.json."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

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


R = Results()


def step(name: str):
    """Run one scenario step; an exception fails check ``name`` and the scenario goes on."""
    def wrap(fn):
        def run(*a, **kw):
            t = time.monotonic()
            try:
                return fn(*a, **kw)
            except Exception:
                R.check(name, False, traceback.format_exc()[-2000:])
            finally:
                R.log(f"step {name}: {time.monotonic() - t:.1f} s")
        return run
    return wrap


@step("setup")
def setup() -> dict:
    for m in EXTRA_MODULES:
        r = ko.modprobe(MODROOT, m)
        if r.returncode:
            R.log(f"modprobe {m}: {r.stderr.strip()}")
    fd = ko.bpf_load_trivial()
    off = ko.kprobe_add("vfs_read")
    ko.function_tracer(True)
    text = Path("/proc/kallsyms").read_text()
    mods = {line.split("\t[")[1].rstrip("]") for line in text.splitlines() if "\t[" in line}
    pseudo = sorted(m for m in mods if m == "bpf" or m.startswith("__builtin__"))
    R.check("setup", {"bpf", "__builtin__kprobes", "__builtin__ftrace"} <= set(pseudo),
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
    R.check("capture", True, str(d))


def main() -> int:
    t0 = time.monotonic()
    R.figure("kernel", os.uname().release)
    setup()
    capture()
    R.figure("scenario_seconds", round(time.monotonic() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
