"""Differential test: the same etcdctl commands against the server under test and a real
etcd 3.4, compared exactly (exit code, stdout, stderr) after normalize.py's normalization.

Each scenario starts a fresh pair of servers. The random scenario prints its seed;
reproduce with KEELSON_DIFF_SEED=<seed> (KEELSON_DIFF_SEED=random picks a new one,
KEELSON_DIFF_OPS sets its length).
"""

import difflib
import json
import os
import random
import sys
import threading
import time
import unittest

import harness
import normalize

DEFAULT_SEED = 20240611
MAX_SHOWN = 8            # mismatches shown in detail
FORMATS = ["simple", "json", "fields", "protobuf"]
TXN_PROMPTS = ("compares:\nsuccess requests (get, put, del):\n"
               "failure requests (get, put, del):\n")


def _show(b, limit=3000):
    s = b.decode("utf-8", "backslashreplace")
    if len(s) > limit:
        s = s[:limit] + "\n... (%d more chars)" % (len(s) - limit)
    return s


def _diff(name, a, b):
    """Readable diff of one output stream; a: server under test, b: etcd."""
    if len(a) + len(b) > 20000:
        i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        return ("  %s differs: sut %d bytes, etcd %d bytes, first difference at byte %d\n"
                "    sut : %r\n    etcd: %r\n" % (name, len(a), len(b), i,
                                                    a[max(0, i - 40):i + 80],
                                                    b[max(0, i - 40):i + 80]))
    la = _show(a).splitlines(keepends=True)
    lb = _show(b).splitlines(keepends=True)
    d = difflib.unified_diff(lb, la, fromfile="etcd " + name, tofile="keelson " + name, n=2)
    lines = ["    " + x if x.endswith("\n") else "    " + x + "\n" for x in d]
    if len(lines) > 60:
        lines = lines[:60] + ["    ... (%d more diff lines)\n" % (len(lines) - 60)]
    return "  %s differs:\n%s" % (name, "".join(lines))


class Pair:
    """Runs each command against both servers (in parallel) and records mismatches."""

    def __init__(self, sut, oracle):
        self.sut, self.oracle = sut, oracle
        self.mismatches = []
        self.count = 0
        self.last_oracle = None

    def run(self, *args, stdin=None, note=None):
        args = [str(a) for a in args]
        res = {}

        def go(name, srv):
            try:
                res[name] = srv.ctl(*args, stdin=stdin)
            except Exception as e:  # noqa: a hung etcdctl is a mismatch too
                res[name] = e

        ts = [threading.Thread(target=go, args=("sut", self.sut)),
              threading.Thread(target=go, args=("etcd", self.oracle))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.count += 1
        a, b = res["sut"], res["etcd"]
        self.last_oracle = b if isinstance(b, harness.Result) else None
        if isinstance(b, Exception):
            raise AssertionError("the oracle etcd failed to answer %r: %r" % (args, b))
        if isinstance(a, Exception):
            self.mismatches.append((self.count, args, stdin, note,
                                    "  server under test did not answer: %r\n" % (a,)))
            return b
        na = normalize.normalize(args, a.rc, a.out, a.err, self.sut.endpoint)
        nb = normalize.normalize(args, b.rc, b.out, b.err, self.oracle.endpoint)
        if na != nb:
            text = ""
            if na[0] != nb[0]:
                text += "  exit code: keelson %d, etcd %d\n" % (na[0], nb[0])
            if na[1] != nb[1]:
                if normalize._output_format(args) == "protobuf" and na[0] == nb[0] == 0:
                    pa, ba = normalize._split_txn_prompts(na[1])
                    pb_, bb = normalize._split_txn_prompts(nb[1])
                    text += _diff("stdout (protobuf, decoded)",
                                  pa + normalize.dump_pb(ba).encode(),
                                  pb_ + normalize.dump_pb(bb).encode())
                else:
                    text += _diff("stdout", na[1], nb[1])
            if na[2] != nb[2]:
                text += _diff("stderr", na[2], nb[2])
            self.mismatches.append((self.count, args, stdin, note, text))
        return b

    def txn(self, text, *args, note=None):
        return self.run("txn", "-i", *args, stdin=text, note=note)

    def report(self, title):
        if not self.mismatches:
            return None
        lines = ["%s: %d of %d commands differ between keelson (%s) and etcd (%s)" % (
            title, len(self.mismatches), self.count, self.sut.binary, self.oracle.binary)]
        for n, args, stdin, note, text in self.mismatches[:MAX_SHOWN]:
            lines.append("\n#%d: etcdctl %s%s" % (n, " ".join(_quote(a) for a in args),
                                                  "   [%s]" % note if note else ""))
            if stdin is not None:
                s = stdin if isinstance(stdin, str) else stdin[:200].decode("utf-8", "replace")
                if len(stdin) > 200:
                    s = s[:80] + "...(%d bytes in all)" % len(stdin)
                lines.append("  stdin: %r" % s)
            lines.append(text.rstrip("\n"))
        if len(self.mismatches) > MAX_SHOWN:
            lines.append("\n... and %d more mismatching commands: %s" % (
                len(self.mismatches) - MAX_SHOWN,
                ", ".join("#%d" % m[0] for m in self.mismatches[MAX_SHOWN:MAX_SHOWN + 40])))
        return "\n".join(lines)


def _quote(a):
    if a == "" or any(c in a for c in " \t\n'\"\\$*?") or not a.isprintable():
        r = repr(a)
        return r if len(r) < 120 else r[:100] + "...'(%d chars)" % len(a)
    return a


class Differential(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        sut, oracle = harness.pair_for_test(self)
        self.p = Pair(sut, oracle)

    def check(self):
        msg = self.p.report(self.id().split(".")[-1])
        if msg:
            self.fail(msg)

    # -- fixed scenarios -------------------------------------------------------------------

    def test_put_get_options(self):
        p = self.p
        for k, v in (("a", "1"), ("b", "2"), ("b/1", "x"), ("b/2", "y"), ("c", "3"), ("a", "11"),
                     ("d", ""), ("e e", "sp ace"), ("b/1", "x2"), ("b/1", "x3"), ("\x7fz", "hi")):
            p.run("put", k, v)
        p.run("put", "a", "12", "--prev-kv")
        p.run("put", "new", "1", "--prev-kv")
        p.run("put", "fromstdin", stdin="value via stdin")
        # Sorting on anything but KEY: etcd 3.4 sorts with Go's sort.Sort, which is stable
        # (insertion sort, ties in key order; DESCEND keeps ties in ascending key order)
        # only for up to 12 results; beyond that the order of ties depends on the Go release
        # etcd was built with. So sorted ranges here hold at most 12 keys (10 at this point).
        for target in ("KEY", "VERSION", "CREATE", "MODIFY", "VALUE"):
            for order in ("ASCEND", "DESCEND", None):
                o = ["--order", order] if order else []
                p.run("get", "", "--prefix", "--sort-by", target, *o)
                p.run("get", "b", "--prefix", "--sort-by", target, "--limit", "2", *o)
                p.run("get", "", "--from-key", "--sort-by", target, "--limit", "4", *o,
                      "-w", "json")
        for fmt in FORMATS + ["table"]:
            p.run("put", "f-" + fmt, "v", "-w", fmt)
            p.run("put", "f-" + fmt, "v2", "--prev-kv", "-w", fmt)
            p.run("get", "a", "-w", fmt)
            p.run("get", "missing", "-w", fmt)
            p.run("get", "b", "--prefix", "-w", fmt)
            p.run("get", "b", "--prefix", "--limit", "2", "-w", fmt)
            p.run("get", "b/", "--from-key", "-w", fmt)
            p.run("get", "a", "--rev", "3", "-w", fmt)
            p.run("get", "", "--prefix", "--keys-only", "-w", fmt)
            p.run("get", "", "--prefix", "--sort-by", "MODIFY", "--order", "DESCEND", "-w", fmt)
            p.run("get", "", "--prefix", "--sort-by", "CREATE", "--limit", "3", "-w", fmt)
        # ties (equal mod revisions: one txn) in a small range; the big unsorted-tie ranges
        # above are over by now
        p.txn("\nput t1 same\nput t2 same\nput t0 same\n\n\n")
        for target in ("MODIFY", "VALUE", "VERSION"):
            for order in ("ASCEND", "DESCEND"):
                p.run("get", "t", "--prefix", "--sort-by", target, "--order", order)
        p.run("get", "", "--prefix", "--order", "DESCEND")
        p.run("get", "", "--from-key", "--order", "DESCEND", "--limit", "3")
        p.run("get", "b", "c")
        p.run("get", "b", "b")
        p.run("get", "c", "a")
        p.run("get", "", "--prefix", "--print-value-only")
        p.run("get", "", "--prefix", "--keys-only", "--print-value-only")
        p.run("get", "", "--prefix", "--hex")
        p.run("get", "", "--prefix", "--consistency", "s")
        p.run("get", "a", "--rev", "1")
        p.run("get", "a", "--rev", "100")
        p.run("get", "a", "--rev", "100", "-w", "json")
        p.run("get", "", "--prefix", "--rev", "5", "--limit", "1")
        p.run("get", "", "--prefix", "--limit", "0")
        p.run("get", "a", "--rev", "-1")
        p.run("get", "a", "--limit", "-1")
        p.run("get", "a", "b", "c")
        p.run("put", "", "v")
        p.run("get", "")
        p.run("get", "", "-w", "json")
        p.run("get", "a", "--sort-by", "bogus")
        p.run("get", "a", "-w", "bogus")
        p.run("put", "only-key")
        self.check()

    def test_delete(self):
        p = self.p
        for k in ("a", "b", "b/1", "b/2", "b/3", "c", "d", "e", "f", "g"):
            p.run("put", k, "v-" + k)
        p.run("del", "a")
        p.run("del", "a")
        p.run("del", "b/", "--prefix", "--prev-kv")
        p.run("del", "nothing", "--prefix", "-w", "json")
        p.run("del", "c", "--prev-kv", "-w", "json")
        p.run("del", "d", "--prev-kv", "-w", "fields")
        p.run("del", "e", "--prev-kv", "-w", "protobuf")
        p.run("del", "f", "g", "-w", "json")
        p.run("get", "", "--prefix", "-w", "json")
        p.run("put", "z1", "1")
        p.run("put", "z2", "2")
        p.run("del", "b", "--from-key", "--prev-kv")
        p.run("del", "", "--prefix")
        p.run("del", "", "--from-key", "-w", "json")
        p.run("del", "")
        p.run("get", "b", "--rev", "4")
        p.run("get", "", "--prefix", "--rev", "12", "-w", "json")
        self.check()

    def test_txn(self):
        p = self.p
        p.run("put", "a", "1")
        p.run("put", "b", "2")
        p.run("put", "b", "22")
        for fmt in FORMATS:
            p.txn('value("a") = "1"\n\nput x y\nget a\n\ndel b\n\n', "-w", fmt)
            p.txn('value("a") = "2"\n\nput x y\n\ndel b --prev-kv\nget a\n\n', "-w", fmt)
            p.txn('\nget "" --prefix\nput q 1 --prev-kv\ndel a --prev-kv\n\n\n', "-w", fmt)
            p.txn('\n\n\n', "-w", fmt)
            p.run("put", "a", "1")
            p.run("put", "b", "2")
        compares = ['value("a") = "1"', 'value("a") != "1"', 'value("a") > "0"',
                    'value("a") < "0"', 'version("b") = "2"', 'version("b") > "1"',
                    'version("b") < "1"', 'create("a") = "2"', 'create("b") > "2"',
                    'mod("b") < "100"', 'mod("a") != "2"', 'version("nope") = "0"',
                    'create("nope") = "0"', 'mod("nope") = "0"', 'value("nope") = ""',
                    'value("nope") != "x"']
        for c in compares:
            p.txn(c + "\n\nget a\n\nget b\n\n")
        p.txn("\n".join(compares) + "\n\nput all yes\n\nput all no\n\n")
        p.txn('value("a") = "1"\n\nput x 1\nput x 2\n\n\n')
        p.txn('\nput x 1\ndel x\n\n\n')
        p.txn('\nget x\nput x 1\n\n\n')
        p.txn('\ndel a --prefix\nput ab 1\n\n\n')
        p.txn('\n' + "".join("put k%d v\n" % i for i in range(129)) + '\n\n')
        p.txn('\n' + "".join("put k%d v\n" % i for i in range(128)) + '\n\n')
        p.txn('\n\n' + "".join("get k%d\n" % i for i in range(129)) + '\n')
        p.txn('bogus\n')
        p.txn('value("a") = "1"\n\nbogus op\n\n\n')
        p.txn('')
        p.txn('\nput "" v\n\n\n')
        p.txn('\nget "" --prefix --keys-only --limit 2\n\n\n', "-w", "json")
        # without -i: the same input, no prompts
        for fmt in FORMATS:
            p.run("txn", "-w", fmt, stdin='value("a") = "1"\nmod("b") > "1"\n\nput n 1\nget a\n'
                  '\nget b\n\n')
            p.run("txn", "-w", fmt, stdin='\n\nput x y\n\n')
        p.run("txn", stdin='bad\n')
        p.run("get", "", "--prefix", "-w", "json")
        self.check()

    def test_compaction(self):
        p = self.p
        for i in range(1, 8):
            p.run("put", "c", str(i))
        p.run("put", "o", "x")
        p.run("compaction", "3")
        p.run("compaction", "3")
        p.run("compaction", "2")
        p.run("compaction", "100")
        p.run("compaction", "0")
        p.run("get", "c", "--rev", "2")
        p.run("get", "c", "--rev", "2", "-w", "json")
        p.run("get", "c", "--rev", "3")
        p.run("get", "", "--prefix", "--rev", "4", "-w", "json")
        p.run("compaction", "6", "--physical")
        p.run("compaction", "6", "--physical")
        for fmt in FORMATS:
            p.run("get", "c", "--rev", "5", "-w", fmt)
            p.run("get", "c", "--rev", "6", "-w", fmt)
        p.run("del", "c")
        p.run("compaction", "10", "-w", "json")
        p.run("get", "c", "--rev", "9")
        p.run("get", "c", "--rev", "10")
        p.run("get", "", "--prefix", "-w", "json")
        p.txn('mod("c") = "0"\n\nput c new\n\n\n')
        p.run("get", "c", "-w", "json")
        p.run("compaction", "11", "--physical")
        p.run("put", "c", "again")
        p.run("get", "c", "--rev", "11", "-w", "fields")
        self.check()

    def test_endpoint(self):
        p = self.p
        p.run("put", "a", "1")
        for fmt in ("simple", "json", "fields", "table", "protobuf"):
            p.run("endpoint", "status", "-w", fmt)
            p.run("endpoint", "health", "-w", fmt)
        p.run("put", "b", "2")
        p.run("put", "a", "3")
        # the hash is etcd's bit for bit; the header carries the current revision
        for rev in ("0", "2", "3", "4"):
            p.run("endpoint", "hashkv", "--rev=" + rev, "-w", "json")
            p.run("endpoint", "hashkv", "--rev=" + rev)
        p.run("endpoint", "hashkv", "--rev=9")
        self.check()

    def test_limits_and_long_keys(self):
        p = self.p
        p.run("put", "big", stdin=b"v" * 1500000)
        p.run("get", "big", "-w", "json")
        p.run("put", "big", stdin=b"w" * 1572800)
        p.run("put", "big", stdin=b"x" * 1572850)
        p.run("put", "big", stdin=b"y" * 2000000)
        p.run("put", "big", stdin=b"z" * 2200000)
        p.run("get", "big", "--print-value-only")
        base = "K" * 1000
        keys = [base + s for s in ("", "a", "b", "a" * 600 + "x", "a" * 600 + "y",
                                   "a" * 3000, "\x01", "b" + "z" * 2000)]
        keys += ["K" * n for n in (509, 510, 511, 512, 513, 999, 1001)]
        for i, k in enumerate(keys):
            p.run("put", k, "v%d" % i)
        p.run("get", "K", "--prefix", "-w", "json")
        p.run("get", base, "--prefix", "--keys-only", "--order", "DESCEND")
        p.run("get", base + "a", base + "b", "--keys-only")
        p.run("get", "K" * 511, "--from-key", "--keys-only", "--limit", "3")
        p.run("get", "", "--prefix", "--keys-only", "--sort-by", "CREATE", "--order", "DESCEND")
        p.run("del", base + "a", "--prefix", "--prev-kv", "-w", "json")
        p.run("get", "K", "--prefix", "--keys-only", "--rev", "10")
        p.txn('value("%s") = "v0"\n\nget %s --prefix --keys-only\n\n\n' % (base, base))
        self.check()

    def test_restart_persistence(self):
        p = self.p
        for i in range(12):
            p.run("put", "k%d" % (i % 5), "v%d" % i)
        p.run("del", "k1")
        p.run("compaction", "6")
        state = [("get", "", "--prefix", "-w", "json"), ("get", "k0", "--rev", "6"),
                 ("get", "k0", "--rev", "5"), ("get", "", "--prefix", "--rev", "9", "-w", "json"),
                 ("endpoint", "status", "-w", "json")]
        for cmd in state:
            p.run(*cmd)
        for s in (p.sut, p.oracle):
            s.restart()
        for cmd in state:
            p.run(*cmd, note="after restart")
        p.run("put", "k9", "after", "-w", "json", note="after restart")
        for s in (p.sut, p.oracle):
            s.restart(kill=True)
        for cmd in state:
            p.run(*cmd, note="after kill -9")
        self.check()

    # -- command line ------------------------------------------------------------------------

    def test_command_line_errors(self):
        """Unknown flags and flags missing their argument: exit code and first stderr line."""
        import subprocess
        import tempfile
        cases = [["--bogus-flag"], ["--name"], ["--data-dir"], ["--snapshot-count", "x"]]
        for extra in cases:
            res = []
            for binary in (self.p.sut.binary, self.p.oracle.binary):
                with tempfile.TemporaryDirectory(prefix="keelson-cli-") as tmp:
                    cport, pport = harness.free_port(), harness.free_port()
                    argv = [binary, "--data-dir", tmp + "/d",
                            "--listen-client-urls", "http://127.0.0.1:%d" % cport,
                            "--advertise-client-urls", "http://127.0.0.1:%d" % cport,
                            "--listen-peer-urls", "http://127.0.0.1:%d" % pport,
                            "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % pport,
                            "--initial-cluster", "default=http://127.0.0.1:%d" % pport] + extra
                    p = subprocess.Popen(argv, cwd=tmp, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=harness.clean_env())
                    try:
                        out, err = p.communicate(timeout=10)
                        rc = p.returncode
                    except subprocess.TimeoutExpired:
                        p.kill()
                        out, err = p.communicate()
                        rc = "still running after 10s"
                    first = (err.decode("utf-8", "replace").splitlines() or [""])[0]
                    res.append((rc, first))
            with self.subTest(args=extra):
                self.assertEqual(res[0], res[1], "keelson %s: %r, etcd: %r" % (
                    " ".join(extra), res[0], res[1]))

    # -- random scenario -------------------------------------------------------------------

    def test_random_sequence(self):
        seed_env = os.environ.get("KEELSON_DIFF_SEED", "")
        if seed_env == "random":
            seed = int(time.time() * 1000) % 1000000007
        elif seed_env:
            seed = int(seed_env)
        else:
            seed = DEFAULT_SEED
        n_ops = int(os.environ.get("KEELSON_DIFF_OPS", "300"))
        print("\n[differential] random sequence: seed=%d ops=%d "
              "(reproduce: KEELSON_DIFF_SEED=%d)" % (seed, n_ops, seed))
        sys.stdout.flush()
        rng = random.Random(seed)
        gen = RandomOps(rng)
        p = self.p
        for i in range(n_ops):
            args, stdin = gen.next()
            b = p.run(*args, stdin=stdin, note="seed %d op %d" % (seed, i))
            gen.observe(args, b)
        p.run("get", "", "--prefix", "-w", "json", note="final state")
        msg = p.report("random sequence seed=%d" % seed)
        if msg:
            self.fail(msg + "\n(reproduce: KEELSON_DIFF_SEED=%d)" % seed)


class RandomOps:
    """Random etcdctl commands over a small key space. Only the oracle's answers feed back
    into the generator (for the current revision), so both servers get identical commands."""

    KEYS = ["k%d" % i for i in range(8)] + ["k1x", "j"]
    VALUES = ["", "a", "b", "v1", "v2", "zz", "0", "10", "9"]

    def __init__(self, rng):
        self.rng = rng
        self.rev = 1
        self.compacted = 0

    def observe(self, args, res):
        if res is None or res.rc != 0:
            return
        out = res.stdout
        if "txn" in args[:1]:
            out = out[len(TXN_PROMPTS):] if out.startswith(TXN_PROMPTS) else out
        if "json" in args:
            try:
                j = json.loads(out)
                if isinstance(j, list):   # endpoint status
                    j = (j[0] if j else {}).get("Status", {})
                r = j.get("header", {}).get("revision")
                if r:
                    self.rev = max(self.rev, r)
            except ValueError:
                pass
        if args[0] == "compaction":
            self.compacted = max(self.compacted, int(args[1]))

    def key(self):
        return self.rng.choice(self.KEYS)

    def fmt(self):
        r = self.rng.random()
        return [] if r < 0.35 else ["-w", "json"] if r < 0.7 else \
            ["-w", self.rng.choice(["fields", "protobuf", "simple"])]

    def range_args(self):
        r = self.rng.random()
        if r < 0.4:
            return [self.key()]
        if r < 0.6:
            return [self.rng.choice(["k", "k1", "", "j", "k7"]), "--prefix"]
        if r < 0.8:
            a, b = self.key(), self.key()
            return [a, b]
        return [self.key(), "--from-key"]

    def next(self):
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            args = ["put", self.key(), rng.choice(self.VALUES)]
            if rng.random() < 0.3:
                args.append("--prev-kv")
            return args + self.fmt(), None
        if r < 0.65:
            args = ["get"] + self.range_args()
            if rng.random() < 0.25:
                args += ["--limit", str(rng.randint(0, 4))]
            if rng.random() < 0.25:
                args += ["--rev", str(rng.randint(max(0, self.compacted - 2), self.rev + 2))]
            if rng.random() < 0.2:
                args += ["--keys-only"]
            if rng.random() < 0.3:
                args += ["--sort-by", rng.choice(["KEY", "VERSION", "CREATE", "MODIFY",
                                                  "VALUE"])]
            if rng.random() < 0.3:
                args += ["--order", rng.choice(["ASCEND", "DESCEND"])]
            if rng.random() < 0.1:
                args += ["--consistency", "s"]
            fmt = self.fmt()
            if not fmt and rng.random() < 0.2:
                args += ["--print-value-only"]
            return args + fmt, None
        if r < 0.78:
            args = ["del"] + self.range_args()
            if rng.random() < 0.4:
                args.append("--prev-kv")
            return args + self.fmt(), None
        if r < 0.95:
            interactive = ["-i"] if rng.random() < 0.7 else []
            return ["txn"] + interactive + self.fmt(), self.txn_text()
        if r < 0.98:
            rev = rng.randint(max(0, self.compacted - 1), self.rev + 1)
            args = ["compaction", str(rev)]
            if rng.random() < 0.5:
                args.append("--physical")
            return args, None
        return ["endpoint", "status", "-w", "json"], None

    def txn_text(self):
        rng = self.rng
        cmps = []
        for _ in range(rng.randint(0, 2)):
            target = rng.choice(["value", "version", "create", "mod"])
            op = rng.choice(["=", "!=", ">", "<"])
            if target == "value":
                val = rng.choice(self.VALUES)
            else:
                val = str(rng.randint(0, max(2, self.rev if target != "version" else 4)))
            cmps.append('%s("%s") %s "%s"' % (target, self.key(), op, val))

        def ops():
            out = []
            for _ in range(rng.randint(0, 3)):
                t = rng.random()
                if t < 0.45:
                    out.append("put %s %s" % (self.key(), rng.choice(self.VALUES[1:])))
                elif t < 0.75:
                    a = self.range_args()
                    out.append("get " + " ".join('""' if x == "" else x for x in a))
                else:
                    a = self.range_args()
                    out.append("del " + " ".join('""' if x == "" else x for x in a) +
                               (" --prev-kv" if rng.random() < 0.3 else ""))
            return out

        parts = cmps + [""] + ops() + [""] + ops() + [""]
        return "\n".join(parts) + "\n"


if __name__ == "__main__":
    unittest.main()
