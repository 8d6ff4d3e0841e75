"""ksymsfs symbolize on real-looking text: an x86_64 oops (kernel and modules), an arm64 one
(with a BPF program), perf script, bpftrace kstack, /proc/PID/stack and raw hex lists.

Every address comes from the dumps in tests/data; the expected text is computed here from
the dump text alone (tests/ksyms_ref.py), so every rewritten address is checked against an
independent lookup, and everything else must come back byte for byte.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ksymsfs.symbolize import Symbolizer, symbolize_text
from tests.helpers import DATA, build_ok, cli_env, parse_input, run_ksymsfs
from tests.ksyms_ref import Reference

# {name+0xoff} is the raw address of name+off; {0x:name+0xoff} the same with "0x".
X86_OOPS = """\
[ 5123.104455] BUG: unable to handle kernel NULL pointer dereference at 0000000000000008
[ 5123.104512] IP: [<{do_sys_open+0x5a}>] do_sys_open+0x5a/0x230
[ 5123.104550] PGD 3b1c7067 PUD 3a9d1067 PMD 0
[ 5123.104577] Oops: 0000 [#1] SMP
[ 5123.104612] CPU: 1 PID: 2144 Comm: cat Tainted: G           O 3.10.0 #1
[ 5123.104640] task: ffff88003aa0e000 ti: ffff88003b3cc000 task.ti: ffff88003b3cc000
[ 5123.104666] RIP: 0010:[<{do_sys_open+0x5a}>]  [<{do_sys_open+0x5a}>] do_sys_open+0x5a/0x230
[ 5123.104700] RSP: 0018:ffff88003b3cff18  EFLAGS: 00010246
[ 5123.104720] RAX: 0000000000000000 RBX: ffff88003aa0e000 RCX: {schedule+0x29}
[ 5123.104741] RDX: 0000000000000001 RSI: 0000000000008000 RDI: 00000000ffffff9c
[ 5123.104800] Code: 48 89 e5 41 57 41 56 41 55 41 54 53 48 83 ec 38 <48> 8b 47 08
[ 5123.104830] Call Trace:
[ 5123.104850]  [<{generic_set_mode+0x14}>] ? generic_set_mode+0x14/0x90 [ata_generic]
[ 5123.104870]  [<{schedule+0x29}>] schedule+0x29/0x70
[ 5123.104890]  [<{schedule_timeout+0x209}>] schedule_timeout+0x209/0x2d0
[ 5123.104910]  [<{wait_for_completion+0x116}>] wait_for_completion+0x116/0x170
[ 5123.104930]  [<{drm_mode_object_find+0x20}>] ? drm_mode_object_find+0x20/0x60 [drm]
[ 5123.104950]  [<{process_one_work+0x17b}>] process_one_work+0x17b/0x470
[ 5123.104970]  [<{worker_thread+0x11b}>] worker_thread+0x11b/0x400
[ 5123.104990]  [<{kthread+0xcf}>] kthread+0xcf/0xe0
[ 5123.105010]  [<{ret_from_fork+0x58}>] ret_from_fork+0x58/0x90
[ 5123.105030]  [<ffffffff00000000>] ? 0xffffffff00000000
[ 5123.105050] RIP  [<{0x:do_sys_open+0x5a}>] 0x{do_sys_open+0x5a}f
[ 5123.105070] ---[ end trace 2f6bdc3a1e5f8c12 ]---
"""

ARM64_OOPS = """\
[   88.420163] Unable to handle kernel paging request at virtual address dead000000000108
[   88.420211] Mem abort info:
[   88.420229]   ESR = 0x0000000096000044
[   88.420260] pc : {0x:exit_mmap+0x1a0}
[   88.420277] lr : {mmput+0x44}
[   88.420292] sp : ffff80008a3bbd20
[   88.420310] x29: ffff80008a3bbd20 x28: ffff0000c53c8000 x27: 0000000000000000
[   88.420350] Call trace:
[   88.420362]  {exit_mmap+0x1a0}
[   88.420380]  {__mmput+0x3c}
[   88.420396]  {mmput+0x44}
[   88.420411]  {do_execveat_common+0x1d4}
[   88.420450]  {el0t_64_sync+0x190}
[   88.420470] Code: f9400a61 b4000061 f9000660 d503201f (f9000433)
"""

PERF_SCRIPT = """\
cat  2144 [001]  5123.104455: cpu-clock:
\t{schedule+0x29} schedule+0x29 ([kernel.kallsyms])
\t{generic_set_mode+0x14} generic_set_mode+0x14 ([ata_generic])
\t7f3e2a1b4c3d __GI___libc_read+0x4d (/usr/lib/x86_64-linux-gnu/libc.so.6)
"""

BPFTRACE_KSTACK = """\
@[
        {schedule+0x29}
        {schedule_timeout+0x209}
        {0x:kthread+0xcf}
]: 17
"""

PROC_STACK = """\
[<0>] do_wait+0x1c7/0x300
[<{wait_for_completion+0x116}>] wait_for_completion+0x116/0x170
"""

RAW_LIST = """\
{schedule+0x29}
{0x:schedule+0x2a},{kthread+0x1}\t{0x:ret_from_fork+0x0}
not-an-address: 0x{schedule+0x29}0 g{schedule+0x29} {schedule+0x29}_x 0x10 1234567890abcdef0
"""

MARK = re.compile(r"\{(0x:)?([^{}+]+)\+(0x[0-9a-f]+)\}")


def _render(template: str, syms: dict[str, int], ref: Reference, width: int) -> tuple[str, str]:
    """(raw text, expected symbolized text) of a template."""
    raw, want, pos = [], [], 0
    for m in MARK.finditer(template):
        raw.append(template[pos:m.start()])
        want.append(template[pos:m.start()])
        addr = syms[m[2]] + int(m[3], 16)
        token = ("0x" if m[1] else "") + f"{addr:0{width}x}"
        raw.append(token)
        before = template[m.start() - 1:m.start()] if m.start() else ""
        after = template[m.end():m.end() + 1]
        glued = bool(re.fullmatch(r"[0-9A-Za-z_]", before)) or bool(
            re.fullmatch(r"[0-9A-Za-z_]", after)) or (before == "x" and not m[1])
        ps = None if glued else ref.ps(addr)
        want.append(token if ps is None else ps)
        pos = m.end()
    raw.append(template[pos:])
    want.append(template[pos:])
    return "".join(raw), "".join(want)


@pytest.fixture(scope="module")
def x86(tmp_path_factory):
    d = DATA / "binun-taiwan-x86_64"
    img = build_ok(tmp_path_factory.mktemp("x86") / "i.elf", kallsyms=d / "kallsyms",
                   modules=d / "modules")
    return img, _syms(d / "kallsyms"), Reference((d / "kallsyms").read_bytes())


@pytest.fixture(scope="module")
def arm64(tmp_path_factory):
    d = DATA / "ebpfexp-arm64-excerpt"
    img = build_ok(tmp_path_factory.mktemp("arm64") / "i.elf", kallsyms=d / "kallsyms",
                   lenient=True)
    return img, _syms(d / "kallsyms"), Reference((d / "kallsyms").read_bytes())


def _syms(path: Path) -> dict[str, int]:
    return {s.name: s.addr for s in parse_input(path.read_bytes())[0]}


def _check(image: Path, template: str, syms, ref: Reference, width: int = 16) -> str:
    raw, want = _render(template, syms, ref, width)
    assert raw != want  # something is to be rewritten
    got = symbolize_text(image, raw.encode()).decode()
    assert got == want
    return want


def test_x86_64_oops(x86):
    img, syms, ref = x86
    want = _check(img, X86_OOPS, syms, ref)
    # modules get their suffix; the address outside every symbol and 0x...f stay
    assert re.search(r"\[<generic_set_mode\+0x14/0x[0-9a-f]+ \[ata_generic\]>\]", want)
    assert "[<ffffffff00000000>] ? 0xffffffff00000000" in want
    assert "RAX: 0000000000000000" in want and "RCX: schedule+0x29/0x" in want


def test_arm64_oops_with_a_bpf_program(arm64):
    img, syms, ref = arm64
    want = _check(img, ARM64_OOPS, syms, ref)
    assert "pc : exit_mmap+0x1a0/0x3c0\n" in want
    # a BPF program: %pS names it without a module; its size is the distance to the
    # next one, capped (README), here also by the small image: not compared exactly
    out = symbolize_text(img, b" ffffffc0806499e0 0xffffffc08071047c\n").decode()
    assert re.fullmatch(r" bpf_prog_ee0e253c78993a24_sd_devices\+0x38/0x[0-9a-f]+ "
                        r"bpf_prog_ab4bc4523b7fe6b4\+0x10/0x[0-9a-f]+\n", out), out


@pytest.mark.parametrize("template", [PERF_SCRIPT, BPFTRACE_KSTACK, PROC_STACK, RAW_LIST],
                         ids=["perf-script", "bpftrace-kstack", "proc-stack", "raw-list"])
def test_other_formats(x86, template):
    img, syms, ref = x86
    _check(img, template, syms, ref)


def test_text_without_addresses_is_unchanged(x86):
    img = x86[0]
    mods = (DATA / "binun-taiwan-x86_64" / "modules").read_bytes()
    # /proc/modules' load addresses are kernel addresses (each module's first symbol) ...
    assert symbolize_text(img, mods) != mods
    # ... the rest of it, and bytes, short or long hex words, timestamps are not
    text = re.sub(rb" 0x[0-9a-f]{16}", b" 0x?", mods) + bytes(range(256)) * 3
    text += b"ffffffff8175f62 ffffffff8175f6200 0xffffffff8175f62 [ 1.000000] 0x10 \xff\xfe\n"
    assert symbolize_text(img, text) == text


def test_32bit_image_uses_8_digit_words(tmp_path):
    d = DATA / "d2000-sep4020-arm32"
    img = build_ok(tmp_path / "i.elf", kallsyms=d / "kallsyms", modules=d / "modules")
    syms = _syms(d / "kallsyms")
    ref = Reference((d / "kallsyms").read_bytes())
    template = ("[<{sep4020_power_irqhandler+0x98}>] (sep4020_power_irqhandler+0x98/0xa8) "
                "from [<{0x:power_timer_handler+0x10}>]\n"
                "00000000{sep4020_power_irqhandler+0x98} is part of a longer word\n")
    _check(img, template, syms, ref, width=8)


def test_cli_file_stdin_and_streaming(x86, tmp_path):
    img, syms, ref = x86
    raw, want = _render(X86_OOPS * 50 + PERF_SCRIPT, syms, ref, 16)
    (tmp_path / "log").write_text(raw)
    r = run_ksymsfs("symbolize", img, tmp_path / "log")
    assert r.returncode == 0 and r.stdout.decode() == want and not r.stderr
    r = run_ksymsfs("symbolize", img, input=raw.encode())
    assert r.returncode == 0 and r.stdout.decode() == want
    # a pipe that delivers one line at a time gets each line back before the next arrives
    p = subprocess.Popen([sys.executable, "-m", "ksymsfs", "symbolize", str(img)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cli_env())
    try:
        for line_raw, line_want in zip(raw.splitlines(True)[:5], want.splitlines(True)[:5]):
            p.stdin.write(line_raw.encode())
            p.stdin.flush()
            assert p.stdout.readline().decode() == line_want
    finally:
        p.stdin.close()
        p.stdout.read()
        p.wait(30)
    r = run_ksymsfs("symbolize", img, tmp_path / "missing")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "missing: cannot read" in err


def test_counts_rewrites(x86):
    img, syms, ref = x86
    raw, _ = _render(BPFTRACE_KSTACK, syms, ref, 16)
    s = Symbolizer(img)
    s.rewrite(raw.encode())
    assert s.rewritten == 3


CANDIDATE = r"(?<![0-9A-Za-z_])(?:0[xX])?[0-9a-fA-F]{%d}(?![0-9A-Za-z_])"


def _random_text(rng, ref: Reference, width: int, n: int) -> bytes:
    """Tokens that stress the word finder: addresses inside symbols (any case, with and
    without 0x/0X), hex words one digit short or long, glued letters, "x", "%", junk."""
    alone = [r for r in ref.syms if r.alone and r.size]
    junk = [b" ", b"\n", b"\t", b"%", b"%s", b"%%", b"x", b"X", b"0", b"0x", b"_", b"g",
            b"[<", b">]", b"\xff", b"-", b"+0x10/0x20", b"\r\n"]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            s = alone[rng.randrange(len(alone))]
            word = f"{s.addr + rng.randrange(s.size):0{width}x}"
            word = word.upper() if rng.random() < 0.1 else word
            out.append((rng.choice(["", "", "0x", "0X"]) + word).encode())
        elif r < 0.6:
            out.append(b"".join(rng.choice(b"0123456789abcdefABCDEF").to_bytes(1, "big")
                                for _ in range(rng.choice((width - 1, width, width + 1)))))
        else:
            out.append(rng.choice(junk))
    return b"".join(out)


def _expected(data: bytes, ref: Reference, width: int) -> bytes:
    def one(m: re.Match) -> bytes:
        ps = ref.ps(int(m[0][-width:], 16))
        return m[0] if ps is None else ps.encode()
    return re.sub((CANDIDATE % width).encode(), one, data)


@pytest.mark.parametrize("seed", range(4))
def test_random_text_is_rewritten_as_a_regex_and_the_reference_say(x86, seed):
    """Word boundaries at every alignment, the text's own "%", 0x/0X, upper case, and
    text cut into blocks anywhere (stream) all give what a plain regex + the reference
    give: the fast path (blocks of byte classes, one % formatting) changes nothing."""
    import io
    import random

    img, _, ref = x86
    rng = random.Random(seed)
    data = _random_text(rng, ref, 16, 3000)
    want = _expected(data, ref, 16)
    assert want != data
    s = Symbolizer(img)
    assert s.rewrite(data) == want
    for k in (1, 2, 7, 31):  # lines re-cut into pieces (each ends with a whole line)
        block = len(data) // (k * 10) + 1
        assert b"".join(s.stream(io.BytesIO(data), block=block)) == want
    for cut in range(0, 40):  # every alignment of the text against the 8-byte blocks
        assert s.rewrite(data[cut:cut + 500]) == _expected(data[cut:cut + 500], ref, 16)


def test_random_text_32bit(tmp_path):
    import random

    d = DATA / "d2000-sep4020-arm32"
    img = build_ok(tmp_path / "i.elf", kallsyms=d / "kallsyms", modules=d / "modules")
    ref = Reference((d / "kallsyms").read_bytes())
    rng = random.Random(5)
    data = _random_text(rng, ref, 8, 3000)
    s = Symbolizer(img)
    for cut in range(0, 12):
        assert s.rewrite(data[cut:]) == _expected(data[cut:], ref, 8)


def test_words_only_at_the_very_end_or_start(x86):
    img, syms, ref = x86
    a = f"{syms['schedule'] + 0x29:016x}".encode()
    s = Symbolizer(img)
    want = ref.ps(syms["schedule"] + 0x29).encode()
    for text, out in ((a, want), (b"0x" + a, want), (b" " + a, b" " + want),
                      (a + b"%", want + b"%"), (b"%" + a + b"%%", b"%" + want + b"%%"),
                      (a[:-1], a[:-1]), (b"x" + a, b"x" + a), (b"00x" + a, b"00x" + a),
                      (a + b" " + a, want + b" " + want), (a + a, a + a), (b"", b"")):
        assert s.rewrite(text) == out, text


def test_cache_of_looked_up_addresses_starting_over(x86, monkeypatch):
    """The sorted cache of %pS texts is bounded: past the bound it starts over, and the
    text is the same either way."""
    import random

    import ksymsfs.symbolize as sz

    img, _, ref = x86
    data = _random_text(random.Random(9), ref, 16, 400)
    want = _expected(data, ref, 16)
    s = Symbolizer(img)
    monkeypatch.setattr(sz, "_CACHE_MAX", 8)
    lines = data.splitlines(True)
    assert b"".join(s.rewrite(ln) for ln in lines * 2) == _expected(data * 2, ref, 16)
    assert len(s._cache.keys) <= 8 + max(len(ln) for ln in lines)
    assert s.rewrite(data) == want


def test_words_after_bytes_above_0x7f_at_every_alignment():
    """The word finder tests 8 bytes at once (SWAR): a byte >= 0x80 next to the digits,
    which could carry into them, changes nothing; the same words as the regex, at every
    alignment, for both widths."""
    from ksymsfs.symbolize import _regex, find_words

    for high in (0x80, 0xA9, 0xC3, 0xFF):
        for digit in b"09afAF":
            for pad in range(9):
                for w in (8, 16):
                    word = bytes([digit]) * w
                    for text in (b"." * pad + bytes([high]) + word,
                                 b"." * pad + word + bytes([high]),
                                 b"." * pad + bytes([high]) + b"0x" + word):
                        text += b" " * 32  # not in the last three blocks (a regex's)
                        s, e = find_words(text, w)
                        want = [(m.start(), m.end()) for m in _regex(w).finditer(text)]
                        assert list(zip(s.tolist(), e.tolist())) == want, (text, w)
