#!/usr/bin/python3
"""Applies a simulated power loss to a stopped process's directory from the undo journal
that tests/fault/powerloss.c (LD_PRELOAD) wrote while the process ran (the process must
have been killed: the journal describes the files as the kill left them).

    powerloss_apply.py --journal J --dir D --mode random --seed 7
    powerloss_apply.py --journal J --dir D --mode lose     # every un-synced change lost
    powerloss_apply.py --journal J --dir D --mode keep     # nothing lost (a plain kill -9)

What a power loss may lose, as modelled here:
  - file data: every 4 KiB page written since its file's last fsync/fdatasync may keep its
    new content or go back to its content at that sync, each page independently (mode
    random: a seeded coin per page; lose: all back; keep: none). Writes through an
    O_DSYNC/O_SYNC descriptor are durable at once (never rolled back, not even by an older
    write to the same bytes).
  - file sizes: a file whose size changed since its last sync keeps the new size or gets
    the old one back (random: a coin per file).
  - directory entries (creations, renames, unlinks): durable only once their directory (a
    rename's: the one it moved the file into) was fsynced; the un-synced ones are lost as a suffix (file systems journal them in order):
    random: a seeded cut point, lose: all, keep: none. An undone rename puts the old name
    back and the replaced file with it (stashed by the shim), an undone creation removes
    the file, an undone unlink restores it.
Writes through a shared writable mmap are not journalled: a journal that shows one of a file
not named by --allow-mmap is refused. Prints one summary line (and --json FILE writes it as
JSON). Exit status 2 on a bad or refused journal.
"""

import argparse
import json
import os
import random
import struct
import sys

PAGE = 4096
HDR = struct.Struct("<c7xQQQQQqqqIIQQ")   # struct rec in powerloss.c (96 bytes)


class Rec:
    __slots__ = ("type", "seq", "dev", "ino", "dev2", "ino2", "off", "len", "old_size",
                 "path", "path2", "data", "flags")


def read_journal(path):
    """The records in order. A record cut short by the kill is dropped: the shim writes a
    record before the change it describes, so that change never happened."""
    raw = open(path, "rb").read()
    recs, pos = [], 0
    while pos + HDR.size <= len(raw):
        (t, seq, dev, ino, dev2, ino2, off, ln, old_size, pl, p2l, dl, flags) = \
            HDR.unpack_from(raw, pos)
        end = pos + HDR.size + pl + p2l + dl
        if end > len(raw):
            break
        r = Rec()
        r.type, r.seq, r.dev, r.ino, r.dev2, r.ino2 = t.decode(), seq, dev, ino, dev2, ino2
        r.off, r.len, r.old_size, r.flags = off, ln, old_size, flags
        p = pos + HDR.size
        r.path = raw[p:p + pl].decode("utf-8", "surrogateescape")
        r.path2 = raw[p + pl:p + pl + p2l].decode("utf-8", "surrogateescape")
        r.data = raw[p + pl + p2l:end]
        if r.type not in "WDTSCRUXM":
            raise ValueError("bad record type %r at byte %d" % (r.type, pos))
        recs.append(r)
        pos = end
    return recs


def pages(off, ln):
    return range(off // PAGE, (off + ln + PAGE - 1) // PAGE) if ln > 0 else range(0)


def subtract(lo, hi, masks):
    """[lo, hi) minus the intervals in masks, as a list of intervals."""
    parts = [(lo, hi)]
    for mlo, mhi in masks:
        nxt = []
        for a, b in parts:
            if mhi <= a or mlo >= b:
                nxt.append((a, b))
                continue
            if a < mlo:
                nxt.append((a, mlo))
            if mhi < b:
                nxt.append((mhi, b))
        parts = nxt
    return parts


def apply(journal, root, mode, seed=0, log=None, allow_mmap=()):
    """allow_mmap: base names of files whose shared writable mappings hold no data that
    must survive (LMDB's lock.mdb); a mapping of any other tracked file is an error, as
    writes through it are not journalled."""
    recs = read_journal(journal)
    for r in recs:
        if r.type == "M" and os.path.basename(r.path) not in allow_mmap:
            raise ValueError("%s is mapped shared and writable: writes through the mapping "
                             "are not journalled, a power loss cannot be simulated" % r.path)
    rng = random.Random(seed)
    stash_dir = journal + ".stash"
    cancelled = {r.off for r in recs if r.type == "X"}
    # the last sync of each file or directory: it covers records with seq < its off
    synced = {}
    for r in recs:
        if r.type == "S":
            k = (r.dev, r.ino)
            synced[k] = max(synced.get(k, 0), r.off)

    def durable(key, seq):
        return seq < synced.get(key, 0)

    files = {}   # (dev, ino) -> non-durable W/T records, in order
    dsync = {}   # (dev, ino) -> [(seq, lo, hi)] of O_DSYNC writes
    dirops = []
    for r in recs:
        k = (r.dev, r.ino)
        if r.type in "WT" and not durable(k, r.seq):
            files.setdefault(k, []).append(r)
        elif r.type == "D":
            dsync.setdefault(k, []).append((r.seq, r.off, r.off + r.len))
        elif r.type in "CRU" and r.seq not in cancelled:
            # a rename is durable once the directory it moved the file into is synced
            # (journalling file systems commit a rename as one transaction)
            ok = durable((r.dev2, r.ino2) if r.type == "R" else k, r.seq)
            if not ok:
                dirops.append(r)

    # -- decisions
    if mode == "lose":
        cut = 0
    elif mode == "keep":
        cut = len(dirops)
    else:
        cut = rng.randint(0, len(dirops))
    undo_dir = dirops[cut:]
    lost_page, lost_size = {}, {}
    for k in sorted(files):
        lost_size[k] = mode == "lose" or (mode == "random" and rng.random() < 0.5)
        for r in files[k]:
            if r.type != "W":
                continue
            for p in pages(r.off, r.len):
                if (k, p) not in lost_page:
                    lost_page[(k, p)] = mode == "lose" or (mode == "random" and rng.random() < 0.5)

    # -- directory entries first (renames keep inodes, so data is found by inode after).
    # mkdir/rmdir are not journalled: a directory an undone change needs is made again (its
    # removal, not followed by an fsync of its parent, is undone with it).
    def parent(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    for r in reversed(undo_dir):
        if r.type == "C":
            if os.path.lexists(r.path):
                os.unlink(r.path)
        elif r.type == "R":
            if os.path.lexists(r.path2):
                os.rename(r.path2, parent(r.path))
            if r.flags:
                os.link(os.path.join(stash_dir, str(r.seq)), parent(r.path2))
        elif r.type == "U":
            if r.flags and not os.path.lexists(r.path):
                os.link(os.path.join(stash_dir, str(r.seq)), parent(r.path))
    where = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            st = os.lstat(p)
            where[(st.st_dev, st.st_ino)] = p

    # -- file data, newest record first: a rolled-back page ends with its oldest content
    npages = sum(1 for v in lost_page.values() if v)
    nbytes = 0
    for k, rs in files.items():
        path = where.get(k)
        if path is None:
            continue   # the file is gone (its creation undone, or unlinked for good)
        with open(path, "r+b") as f:
            for r in reversed(rs):
                masks = [(lo, hi) for s, lo, hi in dsync.get(k, []) if s > r.seq]
                if r.type == "W":
                    for p in pages(r.off, r.len):
                        if not lost_page[(k, p)]:
                            continue
                        lo, hi = max(r.off, p * PAGE), min(r.off + r.len, (p + 1) * PAGE)
                        for a, b in subtract(lo, hi, masks):
                            old = r.data[a - r.off:b - r.off]
                            old += b"\0" * (b - a - len(old))   # past the old end of file
                            f.seek(a)
                            f.write(old)
                            nbytes += b - a
                elif r.type == "T" and r.off < r.old_size and lost_size[k]:
                    f.seek(r.off)   # a shrink undone: the cut-off tail back
                    f.write(r.data)
            if lost_size[k]:
                f.truncate(rs[0].old_size)
    types = {}
    for r in recs:
        types[r.type] = types.get(r.type, 0) + 1
    summary = {"records": len(recs), "types": types, "files": len(files), "pages_lost": npages,
               "pages_kept": len(lost_page) - npages, "bytes_restored": nbytes,
               "sizes_restored": sum(1 for k in files if lost_size[k]),
               "dir_ops_unsynced": len(dirops), "dir_ops_undone": len(undo_dir),
               "undone": ["%s %s%s" % (r.type, r.path, " -> " + r.path2 if r.path2 else "")
                          for r in undo_dir]}
    if log:
        log("powerloss (%s, seed %d): %d records, %d files with un-synced writes, "
            "%d of %d pages rolled back, %d sizes restored, %d of %d un-synced directory "
            "changes undone %s; records by type %s"
            % (mode, seed, len(recs), len(files), npages, len(lost_page),
                                   summary["sizes_restored"], len(undo_dir), len(dirops),
                                   summary["undone"], dict(sorted(types.items()))))
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--journal", required=True)
    ap.add_argument("--dir", required=True, help="the POWERLOSS_DIR the shim tracked")
    ap.add_argument("--mode", choices=("random", "lose", "keep"), default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--allow-mmap", action="append", default=[], metavar="NAME",
                    help="a file name whose shared writable mapping is harmless (lock.mdb)")
    opts = ap.parse_args()
    try:
        s = apply(opts.journal, os.path.realpath(opts.dir), opts.mode, opts.seed, log=print,
                  allow_mmap=opts.allow_mmap)
    except (ValueError, struct.error) as e:
        print("bad journal: %s" % e, file=sys.stderr)
        return 2
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(s, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
