"""Debian's kernel under qemu: the guest's checks (one test each) and host-side checks of the
images it made, against the guest's own /proc/kallsyms."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import IN_CI, run_ksymsfs
from tests.vm import harness

pytestmark = pytest.mark.vm

GUEST_CHECKS = [
    "setup", "snapshot", "sysmodule_sections", "mount_lines", "open_latency",
    "passthrough_falls_back",
    "held_fd_keeps_snapshot", "held_fd_sizes_agree", "next_open_sees_rmmod_modprobe",
    "kptr_restrict_policy", "unprivileged_gets_zeros",
    "churn_modules_no_mixed_image", "churn_modules_enough_images",
    "churn_bpf_no_mixed_image", "churn_bpf_enough_images",
    "churn_modules_crowd_no_mixed_image", "churn_bpf_crowd_no_mixed_image",
]
TOOLS = {"readelf": ("readelf", "-a", "-W"), "nm": ("nm",), "objdump": ("objdump", "-t"),
         "eu-readelf": ("eu-readelf", "-a")}


@pytest.fixture(scope="session")
def guest() -> tuple[dict, Path]:
    """Boot once (kernel download on a fresh checkout): results.json and the output dir.

    VM_CHURN=long for the long churn run; VM_CAPTURE=1 also copies the guest's kallsyms,
    modules and /sys/module/*/sections to OUT/dump (how tests/data/debian12-6.1-x86_64 was made).
    """
    out = harness.CACHE / "out"
    churn = os.environ.get("VM_CHURN", "ci")
    missing = [t for t in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "depmod", "modprobe",
                           "busybox") if not shutil.which(t)]
    if missing:
        msg = f"VM tests need {', '.join(missing)} (scripts/install-deps.sh installs them)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        res = harness.boot(out, churn, harness.TIMEOUT_S[churn],
                           capture=bool(os.environ.get("VM_CAPTURE")))
    except (harness.BootError, subprocess.CalledProcessError) as e:
        pytest.fail(f"guest did not run: {e} {getattr(e, 'stderr', '') or ''}")
    print(f"vm: results in {out}")
    return res, out


@pytest.mark.parametrize("name", GUEST_CHECKS)
def test_guest_check(guest, name: str) -> None:
    res, out = guest
    checks = res["checks"]
    if name not in checks:
        crashed = {k: v["detail"] for k, v in checks.items() if not v["ok"]}
        pytest.fail(f"guest never reported {name!r}; failed steps: {crashed}; "
                    f"serial log: {out / 'serial.log'}")
    assert checks[name]["ok"], checks[name]["detail"]


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8", "surrogateescape").splitlines()


def _dump(image: Path) -> list[str]:
    r = run_ksymsfs("dump", image, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode("utf-8", "surrogateescape").splitlines()


def _diff(want: list[str], got: list[str]) -> tuple[list, list]:
    w, g = Counter(want), Counter(got)
    return list((w - g).items())[:10], list((g - w).items())[:10]


@pytest.mark.parametrize("image", ["snap.elf", "mount.elf"])
def test_dump_is_guest_kallsyms(guest, image: str) -> None:
    """`ksymsfs dump` of the guest's snapshot / mounted image == its /proc/kallsyms."""
    _, out = guest
    missing, extra = _diff(_lines(out / "snap.kallsyms"), _dump(out / image))
    assert not missing and not extra, (missing, extra)


def test_nm_letters_are_kallsyms_letters(guest) -> None:
    _, out = guest
    r = subprocess.run(["nm", "--no-sort", str(out / "snap.elf")], capture_output=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    got = Counter()
    for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
        a, c, n = line.split(" ", 2)
        got[(int(a, 16), c, n)] += 1
    want = Counter()
    for line in _lines(out / "snap.kallsyms"):
        a, c, rest = line.split(" ", 2)
        want[(int(a, 16), c, rest.split("\t")[0])] += 1
    assert got == want, _diff(list(want.elements()), list(got.elements()))


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_is_silent_on_guest_image(guest, tool: str) -> None:
    _, out = guest
    exe, *args = TOOLS[tool]
    if not shutil.which(exe):
        if IN_CI:
            pytest.fail(f"{exe} not installed")
        pytest.skip(f"{exe} not installed")
    r = subprocess.run([exe, *args, str(out / "snap.elf")], capture_output=True, text=True,
                       errors="replace")
    bad = [ln for ln in r.stdout.splitlines() if "warning:" in ln.lower()
           or "error:" in ln.lower()]
    assert r.returncode == 0 and r.stderr == "" and not bad, (r.stderr[:500], bad[:5])


@pytest.mark.parametrize("module", ["bpf", "__builtin__kprobes", "__builtin__ftrace"])
def test_pseudo_module_made_for_real(guest, module: str) -> None:
    """The guest made a real eBPF program, kprobe and function tracer: same lines, same
    module names in the image as in its kallsyms."""
    _, out = guest
    suffix = f"\t[{module}]"
    want = [ln for ln in _lines(out / "snap.kallsyms") if ln.endswith(suffix)]
    got = [ln for ln in _dump(out / "snap.elf") if ln.endswith(suffix)]
    assert want, f"no [{module}] line in the guest's kallsyms"
    assert Counter(got) == Counter(want)
