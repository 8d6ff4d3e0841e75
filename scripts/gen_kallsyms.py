#!/usr/bin/env python3
"""Generate large synthetic but realistic /proc/kallsyms and /proc/modules tables.

    python scripts/gen_kallsyms.py --symbols 3000000 --modules 1000 -o DIR

writes DIR/kallsyms and DIR/modules. As in a real kernel:

* kallsyms lists the core kernel first, sorted by address: per-cpu ``A`` symbols at
  0x0..., then text (T/t/W), rodata (R/r), data (D/d/V) and bss (B/b), each region in
  its own address range with addresses increasing; then module symbols, newest module
  first, each line ending in ``\\t[modname]``; then the pseudo-modules
  ``[__builtin__ftrace]`` and ``[bpf]`` (absent from /proc/modules);
* every module owns its own address range from 0xffffffffc0000000 (0xf8000000 on 32-bit)
  with text, rodata, data and bss parts; its symbols appear in module symtab order
  (here: shuffled), letters uppercase iff exported, and it carries ``__this_module``,
  ``init_module`` and ``cleanup_module`` like every real module;
* /proc/modules (``name size refcnt deps state 0xADDR [(taints)]``) lists modules newest
  first;
* names are 5-60 bytes (mean ~24) with a few long ones up to 200, built from
  kernel-like words (``tcp_v4_rcv``-style), with ``.isra.0``/``.constprop.0``/``.cold``
  suffixes, ``__ksymtab_``/``__kstrtab_`` prefixes, ``__key.1234``-style names, and
  ~1% exact duplicates of static names.

Everything is a pure function of (symbols, modules, bits, seed). Rendering is vectorized
with numpy in chunks (no per-line Python loop): 3M symbols take a few seconds.

Also importable: ``generate(symbols, modules, bits, seed) -> (kallsyms_bytes, modules_bytes)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# ---------------------------------------------------------------------------------------
# The vocabulary and the letter mixes

WORDS = """
init exit probe remove read write get set alloc free lock unlock irq dma pci usb net dev
skb tcp udp ip ipv4 ipv6 sock file inode dentry page mm vma sched task cpu rcu timer
hrtimer work queue buf ring ctx state ops handler cb event trace perf bpf map prog sys do
kmem cache slab ext4 xfs btrfs nfs fuse drm i915 amdgpu snd hda codec acpi of gpio clk
regulator power pm suspend resume hw fw phy mac eth wifi ieee80211 cfg80211 scsi blk bio
req nvme ata virtio vring kvm vcpu vmx svm x86 apic hpet tsc numa node zone lru swap fs
sb super attr sysfs debugfs proc seq show store open release ioctl poll mmap flush sync
fsync commit check validate update handle process submit complete wait wake start stop
reset enable disable config setup cleanup register unregister notifier list hash table
tree rb entry insert delete find lookup search count size len max min mask bits flags id
idx key val data info desc param arg msg cmd status error err fault exception signal pid
uid cred security selinux apparmor audit crypto aes sha256 hmac rng random xor raid md dm
crc32 zlib lz4 zstd compress decompress kobject device driver bus class platform module
kernel user copy from to string str printk log dump stack frame unwind kprobe ftrace jump
label static call text poke patch alternative percpu local global atomic spin mutex rwsem
sem completion kthread worker softirq tasklet napi gro gso netdev neigh route fib nf
conntrack nat iptables xt ebt bridge vlan bond team tun tap veth macvlan wireguard xdp sk
iov iter pipe splice aio io uring epoll eventfd timerfd signalfd inotify fanotify quota
acl xattr mount namespace cgroup memcg cpuset freezer lsm ima evm tpm efi dmi pnp isa
irqchip msi iommu intel amd arm smmu gic fdt folio shmem hugetlb thp khugepaged compaction
migrate vmscan writeback readahead filemap truncate mapping pgtable pmd pte pud p4d tlb
""".split()

# letter -> (probability in the core kernel, probability in a module)
LETTER_MIX = {
    "t": (0.340, 0.500), "T": (0.220, 0.050), "W": (0.004, 0.002),
    "r": (0.170, 0.220), "R": (0.070, 0.040),
    "d": (0.110, 0.120), "D": (0.015, 0.010), "V": (0.0005, 0.0),
    "b": (0.040, 0.050), "B": (0.010, 0.005),
    "A": (0.003, 0.0),
}
# region of each letter: 0 per-cpu (A), 1 text, 2 rodata, 3 data, 4 bss
REGION = {"A": 0, "t": 1, "T": 1, "W": 1, "r": 2, "R": 2, "d": 3, "D": 3, "V": 3,
          "b": 4, "B": 4}
ALIGN = (8, 16, 8, 8, 8)                  # address alignment per region
MEAN_GAP = (0x40, 0x180, 0x100, 0x80, 0x80)  # mean distance between symbols per region

# name prefixes / suffixes per region (bytes, weight); b"" = none
PREFIXES = {
    1: [(b"", 85), (b"__", 5), (b"do_", 3), (b"__x64_sys_", 1), (b"__pfx_", 4),
        (b"trace_event_raw_event_", 1), (b"__bpf_trace_", 1)],
    2: [(b"", 70), (b"__ksymtab_", 10), (b"__kstrtab_", 10), (b"__param_str_", 3),
        (b"__tpstrtab_", 2), (b"__func__", 0), (b"str__", 5)],
    3: [(b"", 85), (b"__tracepoint_", 5), (b"__event_", 4), (b"print_fmt_", 3),
        (b"__", 3)],
    4: [(b"", 90), (b"__", 10)],
    0: [(b"", 100)],
}
SUFFIXES = {
    1: [(b"", 90), (b".isra.0", 3), (b".constprop.0", 3), (b".part.0", 2), (b".cold", 1),
        (b".constprop.1", 1)],
}
# "__key.12345"-style names of statics (frequent in rodata/data/bss, duplicates included)
SPECIAL = [b"__key.", b"__already_done.", b"__func__.", b"__warned.", b"descriptor.",
           b"__print_once.", b"CSWTCH.", b"__UNIQUE_ID_ddebug"]
SPECIAL_P = {2: 0.04, 3: 0.05, 4: 0.08}
DUP_FRACTION = 0.01          # local symbols whose name copies another's
LONG_FRACTION = 0.002        # names of 12..36 words, cut at MAX_NAME
MAX_NAME = 200

# well-known names placed at random positions of their letter (nlist/lookup targets)
WELL_KNOWN = {
    "T": [b"vfs_read", b"vfs_write", b"schedule", b"_printk", b"__kmalloc", b"kfree",
          b"do_sys_open", b"copy_from_user", b"mutex_lock", b"kthread_create_on_node",
          b"register_netdev", b"tcp_v4_rcv", b"ksys_read", b"panic", b"msleep"],
    "t": [b"run_init_process", b"rest_init"],
    "D": [b"init_task", b"jiffies", b"init_net", b"system_wq"],
    "R": [b"linux_banner", b"linux_proc_banner"],
    "B": [b"totalram_pages", b"max_pfn"],
    "b": [b"dmesg_restrict"],
}
# (name, letter, region, at region end?) placed at region boundaries
BOUNDARY = [(b"_stext", "T", 1, False), (b"_etext", "T", 1, True),
            (b"__start_rodata", "R", 2, False), (b"__end_rodata", "R", 2, True),
            (b"_sdata", "D", 3, False), (b"_edata", "D", 3, True),
            (b"__bss_start", "B", 4, False), (b"__bss_stop", "B", 4, True)]

PSEUDO = {b"bpf", b"__builtin__ftrace", b"__builtin__kprobes"}  # not real modules
LAYOUT = {  # bits -> (kernel base, kernel end, module base, module end)
    64: (0xFFFFFFFF81000000, 0xFFFFFFFFBF000000, 0xFFFFFFFFC0000000, 0xFFFFFFFFFE000000),
    32: (0xC1000000, 0xF7000000, 0xF8000000, 0xFF000000),
}
CHUNK = 1 << 18  # lines rendered per numpy pass

_HEXCHARS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(key: np.ndarray, salt: int, field: int) -> np.ndarray:
    """A uniform [0, 1) float per key: a counter-based RNG (same key, same draw)."""
    mixed = (salt * 0x632BE59BD9B4E019 + field * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    h = _mix(key * np.uint64(0x9E3779B97F4A7C15) + np.uint64(mixed))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Pieces:
    """An interned byte-string table: every name is a sequence of piece ids."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.index: dict[bytes, int] = {}

    def add(self, b: bytes) -> int:
        i = self.index.get(b)
        if i is None:
            i = self.index[b] = len(self.items)
            self.items.append(b)
        return i

    def freeze(self):
        lens = np.array([len(b) for b in self.items], np.int64)
        offs = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        return np.frombuffer(b"".join(self.items), np.uint8), offs, lens


def _choice_table(pieces: _Pieces, items) -> tuple[np.ndarray, np.ndarray]:
    """[(bytes, weight)] -> (piece ids, cumulative probabilities)."""
    ids = np.array([pieces.add(b) for b, _ in items], np.int64)
    w = np.array([w for _, w in items], np.float64)
    return ids, np.cumsum(w) / w.sum()


def _pick(table, u: np.ndarray) -> np.ndarray:
    ids, cdf = table
    return ids[np.minimum(np.searchsorted(cdf, u, side="right"), len(ids) - 1)]


def _syllable_words(rng: np.random.Generator, n: int) -> list[bytes]:
    cons = [b"b", b"c", b"d", b"f", b"g", b"h", b"k", b"l", b"m", b"n", b"p", b"r", b"s",
            b"t", b"v", b"w", b"z", b"ch", b"st", b"tr", b"pl"]
    vow = [b"a", b"e", b"i", b"o", b"u", b"io", b"ea"]
    nsyl = rng.integers(1, 4, n)
    ci = rng.integers(0, len(cons), (n, 3))
    vi = rng.integers(0, len(vow), (n, 3))
    out = []
    for k in range(n):
        out.append(b"".join(cons[ci[k, j]] + vow[vi[k, j]] for j in range(nsyl[k])))
    return out


def _gaps(rng: np.random.Generator, n: int, mean: float, align: int,
          alias: float = 0.01) -> np.ndarray:
    """Distances between consecutive symbols: gamma-distributed, aligned, some aliases (0)."""
    g = rng.gamma(0.7, max(mean, align) / 0.7, n)
    g = np.maximum(np.ceil(g / align), 1).astype(np.uint64) * np.uint64(align)
    g[rng.random(n) < alias] = 0
    return g


def _module_names(rng: np.random.Generator, m: int, vocab: list[bytes]) -> list[bytes]:
    """Unique module names like snd_hda_codec or nf_conntrack_ipv4."""
    names: list[bytes] = []
    seen: set[bytes] = set()
    common = WORDS[:200]
    for _ in range(m):
        k = int(rng.integers(1, 4))
        parts = [common[int(rng.integers(0, len(common)))].encode() if rng.random() < 0.7
                 else vocab[int(rng.integers(0, len(vocab)))] for _ in range(k)]
        nm = b"_".join(parts)
        base, n = nm, 1
        while nm in seen or nm in PSEUDO:
            n += 1
            nm = base + str(n).encode()
        seen.add(nm)
        names.append(nm)
    return names


def _split_counts(rng: np.random.Generator, total: int, m: int) -> np.ndarray:
    """Symbols per module: heavy-tailed (a few drivers with thousands), each >= 3."""
    if m == 0:
        return np.zeros(0, np.int64)
    w = rng.lognormal(0.0, 1.3, m)
    cnt = np.maximum(np.floor(w / w.sum() * total).astype(np.int64), 3)
    diff = total - int(cnt.sum())
    order = np.argsort(-cnt, kind="stable")
    i = 0
    while diff != 0:  # adjust the biggest modules (a handful of iterations)
        j = order[i % m]
        step = diff if diff > 0 else max(diff, 3 - int(cnt[j]))
        cnt[j] += step
        diff -= step
        i += 1
        if i > 10 * m:
            break
    return cnt


def _letters(rng: np.random.Generator, n: int, col: int) -> np.ndarray:
    keys = [k for k in LETTER_MIX if LETTER_MIX[k][col] > 0]
    p = np.array([LETTER_MIX[k][col] for k in keys])
    return np.frombuffer("".join(keys).encode(), np.uint8)[rng.choice(len(keys), n, p=p / p.sum())]


_REGION_OF = np.full(256, 1, np.int64)
for _ch, _r in REGION.items():
    _REGION_OF[ord(_ch)] = _r


def _plan(symbols: int, modules: int, bits: int, seed: int, module_fraction: float):
    """Per line: address, letter, name key / fixed name, module; plus the /proc/modules text."""
    if bits not in LAYOUT:
        raise ValueError("bits must be 32 or 64")
    if symbols < 50:
        raise ValueError("need at least 50 symbols")
    rng = np.random.default_rng(seed)
    kbase, kend, mbase, mend = LAYOUT[bits]
    pieces = _Pieces()
    for s in (b"", b"_", b"\n"):
        pieces.add(s)
    vocab = [w.encode() for w in WORDS] + _syllable_words(rng, 4000)
    vocab_ids = np.array([pieces.add(w) for w in vocab], np.int64)
    vocab_sep = np.array([pieces.add(b"_" + w) for w in vocab], np.int64)
    vlen = np.array([len(w) for w in vocab], np.float64)
    zipf = 1.0 / (np.arange(len(vocab)) + 30.0)
    bins = (np.arange(1 << 16) + 0.5) / (1 << 16)  # 16-bit hash -> word, Zipf-like
    tok_tab = np.searchsorted(np.cumsum(zipf) / zipf.sum(), bins)
    longw = (vlen >= 5).astype(np.float64)  # one-word names: any 5+ byte word
    long_tab = np.searchsorted(np.cumsum(longw) / longw.sum(), bins)

    npseudo = 0 if symbols < 1000 else 1 + min(8, symbols // 20000)
    modules = min(modules, max(0, (symbols - npseudo) // 10))
    msyms = 0
    if modules:
        msyms = max(int(round(symbols * module_fraction)), 3 * modules)
        msyms = min(msyms, symbols - npseudo - 40)
    ksyms = symbols - msyms - npseudo

    # --- core kernel: letters grouped by region, addresses increasing within each region
    klet = _letters(rng, ksyms, 0)
    kreg = _REGION_OF[klet]
    order = np.argsort(kreg, kind="stable")
    klet, kreg = klet[order], kreg[order]
    kaddr = np.zeros(ksyms, np.uint64)
    budget = (kend - kbase) * 0.6
    need = sum(MEAN_GAP[r] * int(np.count_nonzero(kreg == r)) for r in range(1, 5))
    scale = min(1.0, budget / max(need, 1))
    cur = kbase
    fixed = np.full(symbols, -1, np.int64)
    for r in range(5):
        sel = np.flatnonzero(kreg == r)
        if len(sel) == 0:
            continue
        g = _gaps(rng, len(sel), MEAN_GAP[r] * (1.0 if r == 0 else scale), ALIGN[r],
                  0.0 if r == 0 else 0.01)
        start = 0 if r == 0 else cur
        g[0] = 0
        kaddr[sel] = np.uint64(start) + np.cumsum(g)
        if r:
            end = int(kaddr[sel[-1]]) + ALIGN[r]
            cur = (end + 0xFFFFF) & ~0xFFFFF  # next region at the next 1 MiB
        for name, let, reg, at_end in BOUNDARY:
            if reg == r and len(sel) >= 4:
                i = int(sel[-1] if at_end else sel[0])
                klet[i] = ord(let)
                fixed[i] = pieces.add(name)
    if cur > kend:
        raise ValueError("kernel regions overflow the address layout")
    # well-known names at random positions of their letter
    for let, names in WELL_KNOWN.items():
        cand = np.flatnonzero((klet == ord(let)) & (fixed[:ksyms] < 0))
        if len(cand) < len(names):
            continue
        for name, i in zip(names, rng.choice(cand, len(names), replace=False)):
            fixed[int(i)] = pieces.add(name)

    # --- modules: load order 0..M-1 (oldest first, lowest addresses)
    counts = _split_counts(rng, msyms, modules)
    mnames = _module_names(rng, modules, vocab)
    mid = np.repeat(np.arange(modules), counts)
    mlet = _letters(rng, msyms, 1)
    firsts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    for k, let in enumerate("Dtt"):  # __this_module, init_module, cleanup_module
        mlet[firsts + k] = ord(let)
    mreg = _REGION_OF[mlet]
    o = np.lexsort((mreg, mid))  # by module, then region
    mid_s, mreg_s = mid[o], mreg[o]
    mscale = min(1.0, (mend - mbase) * 0.5 / max(1, sum(
        MEAN_GAP[r] * int(np.count_nonzero(mreg == r)) for r in range(1, 5))))
    g = np.zeros(msyms, np.uint64)
    for r in range(1, 5):
        sel = np.flatnonzero(mreg_s == r)
        g[sel] = _gaps(rng, len(sel), MEAN_GAP[r] * mscale, ALIGN[r], 0.0)
    newgrp = np.ones(msyms, bool)
    newgrp[1:] = (mid_s[1:] != mid_s[:-1]) | (mreg_s[1:] != mreg_s[:-1])
    gstart = np.flatnonzero(newgrp)
    excl = np.cumsum(g) - g
    within = excl - excl[gstart][np.cumsum(newgrp) - 1]
    gsize = np.add.reduceat(g, gstart) if msyms else np.zeros(0, np.uint64)
    gsize = (gsize + np.uint64(0x10 + 0xFFF)) & ~np.uint64(0xFFF)  # page-aligned parts
    gmod = mid_s[gstart]
    guard = gmod.astype(np.uint64) * np.uint64(0x1000)  # a free page between modules
    gbase = np.uint64(mbase) + (np.cumsum(gsize) - gsize) + guard
    maddr_s = gbase[np.cumsum(newgrp) - 1] + within
    maddr = np.empty(msyms, np.uint64)
    maddr[o] = maddr_s
    mod_base = np.zeros(modules, np.uint64)
    mod_size = np.zeros(modules, np.uint64)
    if modules:
        first_grp = np.flatnonzero(np.r_[True, gmod[1:] != gmod[:-1]])
        mod_base[gmod[first_grp]] = gbase[first_grp]
        np.add.at(mod_size, gmod, gsize)
    mod_end = int((mod_base + mod_size).max()) if modules else mbase
    if mod_end + 0x100000 > mend:
        raise ValueError("modules overflow the address layout")

    # kallsyms order of module symbols: newest module first, symtab order (shuffled) inside
    mo = np.lexsort((rng.random(msyms), -mid))
    mod_fixed = np.full(msyms, -1, np.int64)
    for k, nm in enumerate([b"__this_module", b"init_module", b"cleanup_module"]):
        mod_fixed[firsts + k] = pieces.add(nm)

    # --- pseudo-modules after the modules: one ftrace trampoline, a few BPF programs
    plet = np.full(npseudo, ord("t"), np.uint8)
    paddr = (np.uint64((mod_end + 0x100000) & ~0xFFFFF)
             + np.arange(npseudo, dtype=np.uint64) * np.uint64(0x1000))
    pfixed = np.empty(npseudo, np.int64)
    if npseudo:
        pfixed[0] = pieces.add(b"ftrace_trampoline")
        for k in range(1, npseudo):
            tag = int(rng.integers(0, 1 << 63))
            nm = f"bpf_prog_{tag:016x}_{WORDS[int(rng.integers(0, 60))]}".encode()
            pfixed[k] = pieces.add(nm)

    # --- assemble per-line arrays in kallsyms order
    addr = np.concatenate((kaddr, maddr[mo], paddr))
    letter = np.concatenate((klet, mlet[mo], plet))
    fixed[ksyms:ksyms + msyms] = mod_fixed[mo]
    fixed[ksyms + msyms:] = pfixed
    end_piece = np.full(symbols, 2, np.int64)  # "\n"
    modpre = np.full(symbols, -1, np.int64)
    if modules:
        suf_ids = np.array([pieces.add(b"\t[" + n + b"]\n") for n in mnames], np.int64)
        pre_ids = np.array([pieces.add(n + b"_") for n in mnames], np.int64)
        end_piece[ksyms:ksyms + msyms] = suf_ids[mid[mo]]
        modpre[ksyms:ksyms + msyms] = pre_ids[mid[mo]]
    if npseudo:
        end_piece[ksyms + msyms] = pieces.add(b"\t[__builtin__ftrace]\n")
        end_piece[ksyms + msyms + 1:] = pieces.add(b"\t[bpf]\n")

    # name keys: unique per line, except ~1% of local symbols that copy another's name
    key = np.arange(symbols, dtype=np.uint64)
    region = _REGION_OF[letter]
    for let in b"trdb":
        cand = np.flatnonzero((letter == let) & (fixed < 0))
        nd = int(len(cand) * DUP_FRACTION)
        if nd:
            key[rng.choice(cand, nd, replace=False)] = key[rng.choice(cand, nd)]

    tables = {
        "pre": {r: _choice_table(pieces, PREFIXES.get(r, [(b"", 1)])) for r in range(5)},
        "suf": {r: _choice_table(pieces, SUFFIXES.get(r, [(b"", 1)])) for r in range(5)},
        "special": np.array([pieces.add(s) for s in SPECIAL], np.int64),
        "numbers": np.array([pieces.add(str(i).encode()) for i in range(1, 40000)], np.int64),
        "vocab": vocab_ids, "vocab_": vocab_sep,
        "tok": np.minimum(tok_tab, len(vocab) - 1),
        "long_tok": np.minimum(long_tab, len(vocab) - 1),
    }
    modules_text = _modules_text(rng, mnames, mod_base, mod_size, bits)
    plan = dict(addr=addr, letter=letter, region=region, key=key, fixed=fixed,
                end_piece=end_piece, modpre=modpre)
    return plan, tables, pieces, modules_text


def _modules_text(rng, mnames, mod_base, mod_size, bits) -> bytes:
    """/proc/modules, newest first; deps are older modules (names followed by commas)."""
    m = len(mnames)
    lines = []
    w = bits // 4
    for i in range(m - 1, -1, -1):
        ndeps = int(rng.integers(0, 4)) if i and rng.random() < 0.4 else 0
        deps = sorted({int(d) for d in rng.integers(0, i, ndeps)}) if ndeps else []
        dep = "".join(mnames[d].decode() + "," for d in deps) or "-"
        refcnt = int(rng.integers(0, 6))
        taint = " (OE)" if rng.random() < 0.02 else ""
        lines.append(f"{mnames[i].decode()} {int(mod_size[i])} {refcnt} {dep} Live "
                     f"0x{int(mod_base[i]):0{w}x}{taint}\n")
    return "".join(lines).encode()


def _name_spec(plan, tables, seed: int, a: int, b: int):
    """(prefix piece, word count, suffix piece) of lines a..b, from each line's name key."""
    key = plan["key"][a:b]
    region = plan["region"][a:b]
    fixed = plan["fixed"][a:b]
    modpre = plan["modpre"][a:b]
    n = b - a
    u = [_uniform(key, seed, f) for f in range(6)]
    pre = np.zeros(n, np.int64)
    suf = np.zeros(n, np.int64)
    for r in range(5):
        sel = region == r
        if sel.any():
            pre[sel] = _pick(tables["pre"][r], u[0][sel])
            suf[sel] = _pick(tables["suf"][r], u[1][sel])
    # words: 1..7 (mean ~4), a few long names of 12..36 words
    ntok = 1 + (u[2] > 0.03) + (u[2] > 0.22) + (u[2] > 0.45) + (u[2] > 0.70) + (u[2] > 0.88) \
        + (u[2] > 0.97)
    ntok = np.where(u[3] < LONG_FRACTION, 12 + (u[4] * 25).astype(np.int64), ntok)
    # module symbols often start with the module's name
    usemod = (modpre >= 0) & (u[4] < 0.6)
    pre = np.where(usemod, modpre, pre)
    # "__key.123"-style statics
    sp = np.zeros(n, bool)
    for r, p in SPECIAL_P.items():
        sp |= (region == r) & (u[5] < p)
    sp &= ~usemod
    if sp.any():
        pre[sp] = tables["special"][(u[3][sp] * len(tables["special"])).astype(np.int64)]
        nums = tables["numbers"]
        suf[sp] = nums[(u[4][sp] ** 2 * len(nums)).astype(np.int64)]
        ntok[sp] = 0
    fx = fixed >= 0
    pre[fx], suf[fx], ntok[fx] = fixed[fx], 0, 0
    return key, pre, ntok.astype(np.int64), suf


def _render(plan, tables, pbuf, poff, plen, seed: int, bits: int, a: int, b: int) -> bytes:
    """Lines a..b as bytes: ADDR ' ' LETTER ' ' NAME [\\t[MOD]] '\\n', all vectorized."""
    n = b - a
    key, pre, ntok, suf = _name_spec(plan, tables, seed, a, b)
    end = plan["end_piece"][a:b]
    # pieces per line: prefix, word, _word, ..., _word, suffix, line end
    cnt = 3 + ntok
    first = np.cumsum(cnt) - cnt
    total = int(cnt.sum())
    line = np.repeat(np.arange(n), cnt)
    pos = np.arange(total) - first[line]
    last = (cnt - 1)[line]
    piece = np.empty(total, np.int64)
    piece[first] = pre
    piece[first + cnt - 1] = end
    piece[first + cnt - 2] = suf
    word = (pos > 0) & (pos < last - 1)
    wl = line[word]
    k = pos[word] - 1
    h = _mix(key[wl] * np.uint64(0x9E3779B97F4A7C15) + k.astype(np.uint64) * np.uint64(0x85EBCA6B)
             + np.uint64(seed * 7919 + 12345))
    tok = tables["tok"][(h >> np.uint64(48)).astype(np.intp)]
    single = ntok[wl] == 1  # one-word names: a word of 5+ bytes
    tok[single] = tables["long_tok"][(h[single] >> np.uint64(48)).astype(np.intp)]
    piece[word] = np.where(k == 0, tables["vocab"][tok], tables["vocab_"][tok])
    # lengths, with names cut at MAX_NAME bytes
    ln = plen[piece]
    cs = np.cumsum(ln)
    start = cs - ln - (cs - ln)[first][line]
    ln = np.where(pos == last, ln, np.clip(MAX_NAME - start, 0, ln))
    # header piece per line: fixed-width hex address, space, letter, space
    w = bits // 4
    hw = w + 3
    addr = plan["addr"][a:b]
    shifts = np.arange(w - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    hdr = np.empty((n, hw), np.uint8)
    hdr[:, :w] = _HEXCHARS[((addr[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]
    hdr[:, w] = 32
    hdr[:, w + 1] = plan["letter"][a:b]
    hdr[:, w + 2] = 32
    src = np.concatenate((pbuf, hdr.ravel()))
    # every line = header + its pieces; lay all pieces end to end and gather their bytes
    # with one cumsum: index steps by 1 inside a piece and jumps to the next piece's source
    soff = np.empty(total + n, np.int64)
    slen = np.empty(total + n, np.int64)
    hpos = first + np.arange(n)          # where each line's header goes among the pieces
    body = np.ones(total + n, bool)
    body[hpos] = False
    soff[hpos] = len(pbuf) + np.arange(n) * hw
    slen[hpos] = hw
    soff[body] = poff[piece]
    slen[body] = ln
    keep = slen > 0
    soff, slen = soff[keep], slen[keep]
    step = np.ones(int(slen.sum()), np.int64)
    step[0] = soff[0]
    step[(np.cumsum(slen) - slen)[1:]] = soff[1:] - (soff[:-1] + slen[:-1]) + 1
    return src[np.cumsum(step)].tobytes()


def generate(symbols: int, modules: int = 0, bits: int = 64, seed: int = 0,
             module_fraction: float = 0.2) -> tuple[bytes, bytes]:
    """-> (kallsyms text, /proc/modules text). Deterministic for the arguments."""
    plan, tables, pieces, modules_text = _plan(symbols, modules, bits, seed, module_fraction)
    pbuf, poff, plen = pieces.freeze()
    parts = [_render(plan, tables, pbuf, poff, plen, seed, bits, a, min(a + CHUNK, symbols))
             for a in range(0, symbols, CHUNK)]
    return b"".join(parts), modules_text


def write(outdir: str, symbols: int, modules: int = 0, bits: int = 64, seed: int = 0,
          module_fraction: float = 0.2) -> tuple[str, str]:
    """generate() into outdir/kallsyms and outdir/modules; returns the two paths."""
    ks, mods = generate(symbols, modules, bits, seed, module_fraction)
    os.makedirs(outdir, exist_ok=True)
    kp, mp = os.path.join(outdir, "kallsyms"), os.path.join(outdir, "modules")
    for path, data in ((kp, ks), (mp, mods)):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return kp, mp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, required=True, metavar="N", help="kallsyms lines")
    p.add_argument("--modules", type=int, default=0, metavar="M", help="loaded modules")
    p.add_argument("--bits", type=int, choices=(32, 64), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--module-fraction", type=float, default=0.2, metavar="F",
                   help="share of symbols that belong to modules (default 0.2)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    kp, mp = write(a.output, a.symbols, a.modules, a.bits, a.seed, a.module_fraction)
    dt = time.perf_counter() - t0
    print(f"{kp}: {a.symbols} symbols, {os.path.getsize(kp)} bytes; {mp}: "
          f"{os.path.getsize(mp)} bytes; {dt:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
