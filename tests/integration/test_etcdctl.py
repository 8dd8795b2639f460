"""Integration tests: the real etcdctl 3.4 (and python3-etcd3) against the server under test.

Every expectation here is what a real etcd 3.4.23 does; the suite must pass 100% with
KEELSON_BIN=/usr/bin/etcd.
"""

import base64
import json
import re
import threading
import time
import unittest

import harness

MiB = 1024 * 1024


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class Base(unittest.TestCase):
    """Each test gets its own fresh server (start-up is fast), so revisions are predictable."""
    maxDiff = 8000

    def setUp(self):
        self.s = harness.fresh_server(self)

    def ctl(self, *args, **kw):
        return self.s.ctl(*args, **kw)

    def ok(self, r, stdout=None):
        self.assertEqual(r.rc, 0, "expected success: %r" % r)
        self.assertEqual(r.stderr, "", "unexpected stderr: %r" % r)
        if stdout is not None:
            self.assertEqual(r.stdout, stdout, "argv: %r" % (r.argv,))
        return r

    def fails(self, r, message, rc=1):
        """etcdctl failed with `Error: <message>` as its last stderr line."""
        self.assertEqual(r.rc, rc, "expected exit %d: %r" % (rc, r))
        self.assertEqual(r.stdout, "", "unexpected stdout: %r" % r)
        last = r.stderr.rstrip("\n").split("\n")[-1]
        self.assertEqual(last, "Error: " + message, "stderr: %r" % r.stderr)
        return r

    def put(self, k, v):
        self.ok(self.ctl("put", k, v), "OK\n")

    def json(self, *args, **kw):
        r = self.ok(self.ctl(*args, "-w", "json", **kw))
        return json.loads(r.stdout)

    def rev(self):
        return self.json("get", "x-no-such-key")["header"]["revision"]


# ---------------------------------------------------------------------------------------

class PutGet(Base):
    def test_put_get(self):
        self.put("foo", "bar")
        self.ok(self.ctl("get", "foo"), "foo\nbar\n")
        self.ok(self.ctl("get", "nope"), "")
        self.put("foo", "baz")
        self.ok(self.ctl("get", "foo"), "foo\nbaz\n")

    def test_put_value_from_stdin_and_special_bytes(self):
        self.ok(self.ctl("put", "k", stdin="from stdin"), "OK\n")
        self.ok(self.ctl("get", "k", "--print-value-only"), "from stdin\n")
        self.put("sp ace", "multi\nline")
        self.ok(self.ctl("get", "sp ace"), "sp ace\nmulti\nline\n")
        self.ok(self.ctl("put", "e", ""), "OK\n")
        self.ok(self.ctl("get", "e"), "e\n\n")

    def test_put_prev_kv(self):
        self.ok(self.ctl("put", "k", "v1", "--prev-kv"), "OK\n")
        self.ok(self.ctl("put", "k", "v2", "--prev-kv"), "OK\nk\nv1\n")

    def test_get_prefix(self):
        for k in ("p", "p/a", "p/b", "p/c", "pz", "o", "q"):
            self.put(k, "v-" + k)
        self.ok(self.ctl("get", "p/", "--prefix", "--keys-only"), "p/a\n\np/b\n\np/c\n\n")
        self.ok(self.ctl("get", "p", "--prefix", "--keys-only"),
                "p\n\np/a\n\np/b\n\np/c\n\npz\n\n")
        self.ok(self.ctl("get", "", "--prefix", "--keys-only"),
                "o\n\np\n\np/a\n\np/b\n\np/c\n\npz\n\nq\n\n")
        self.ok(self.ctl("get", "zz", "--prefix"), "")

    def test_get_range(self):
        for k in "abcde":
            self.put(k, k.upper())
        self.ok(self.ctl("get", "b", "d"), "b\nB\nc\nC\n")
        self.ok(self.ctl("get", "b", "b"), "")
        self.ok(self.ctl("get", "d", "b"), "")

    def test_get_from_key(self):
        for k in ("a", "b", "ba", "c", "\x7f"):
            self.put(k, "1")
        self.ok(self.ctl("get", "b", "--from-key", "--keys-only"), "b\n\nba\n\nc\n\n\x7f\n\n")
        self.ok(self.ctl("get", "", "--from-key", "--keys-only"),
                "a\n\nb\n\nba\n\nc\n\n\x7f\n\n")
        self.ok(self.ctl("get", "d", "--from-key"), "\x7f\n1\n")

    def test_get_limit(self):
        for k in "abcde":
            self.put("l/" + k, k)
        self.ok(self.ctl("get", "l/", "--prefix", "--limit", "2"), "l/a\na\nl/b\nb\n")
        j = self.json("get", "l/", "--prefix", "--limit", "2")
        self.assertEqual(j["count"], 5)
        self.assertTrue(j["more"])
        self.assertEqual([base64.b64decode(kv["key"]).decode() for kv in j["kvs"]],
                         ["l/a", "l/b"])
        j = self.json("get", "l/", "--prefix", "--limit", "5")
        self.assertNotIn("more", j)
        self.assertEqual(j["count"], 5)
        self.ok(self.ctl("get", "l/", "--prefix", "--limit", "2", "--order", "DESCEND"),
                "l/e\ne\nl/d\nd\n")

    def test_get_rev_history(self):
        self.put("h", "1")   # rev 2
        self.put("h", "2")   # rev 3
        self.put("g", "x")   # rev 4
        self.ok(self.ctl("del", "h"), "1\n")  # rev 5
        self.put("h", "3")   # rev 6
        self.ok(self.ctl("get", "h", "--rev", "2"), "h\n1\n")
        self.ok(self.ctl("get", "h", "--rev", "4"), "h\n2\n")
        self.ok(self.ctl("get", "h", "--rev", "5"), "")
        self.ok(self.ctl("get", "h", "--rev", "6"), "h\n3\n")
        self.ok(self.ctl("get", "", "--prefix", "--rev", "3"), "h\n2\n")
        self.ok(self.ctl("get", "", "--prefix", "--rev", "1"), "")
        j = self.json("get", "h", "--rev", "3")
        self.assertEqual(j["header"]["revision"], 6)
        self.assertEqual(j["kvs"], [{"key": b64("h"), "create_revision": 2, "mod_revision": 3,
                                     "version": 2, "value": b64("2")}])
        j = self.json("get", "h")
        self.assertEqual(j["kvs"], [{"key": b64("h"), "create_revision": 6, "mod_revision": 6,
                                     "version": 1, "value": b64("3")}])

    def test_future_revision(self):
        self.put("a", "1")
        self.fails(self.ctl("get", "a", "--rev", "3"),
                   "etcdserver: mvcc: required revision is a future revision")
        self.ok(self.ctl("get", "a", "--rev", "2"), "a\n1\n")

    def test_keys_only_and_print_value_only(self):
        self.put("k1", "v1")
        self.put("k2", "v2")
        self.ok(self.ctl("get", "k", "--prefix", "--keys-only"), "k1\n\nk2\n\n")
        self.ok(self.ctl("get", "k", "--prefix", "--print-value-only"), "v1\nv2\n")
        self.ok(self.ctl("get", "k", "--prefix", "--keys-only", "--print-value-only"), "\n\n")
        j = self.json("get", "k", "--prefix", "--keys-only")
        self.assertEqual(j["kvs"], [
            {"key": b64("k1"), "create_revision": 2, "mod_revision": 2, "version": 1},
            {"key": b64("k2"), "create_revision": 3, "mod_revision": 3, "version": 1}])

    def test_empty_key(self):
        self.fails(self.ctl("put", "", "v"), "etcdserver: key is not provided")
        self.fails(self.ctl("get", ""), "etcdserver: key is not provided")
        self.fails(self.ctl("del", ""), "etcdserver: key is not provided")
        self.assertTrue(self.s.alive())


class Sorting(Base):
    # x: create 4, mod 6, version 3, value "b2"
    # y: create 2, mod 7, version 2, value "a"
    # z: create 3, mod 3, version 1, value "v"
    ORDERS = {"KEY": "xyz", "CREATE": "yzx", "MODIFY": "zxy", "VERSION": "zyx", "VALUE": "yxz"}

    def setUp(self):
        super().setUp()
        for k, v in (("y", "v"), ("z", "v"), ("x", "v"), ("x", "b"), ("x", "b2"), ("y", "a")):
            self.put(k, v)

    def test_sort_by_each_target(self):
        for target, order in self.ORDERS.items():
            for direction, seq in (("ASCEND", order), ("DESCEND", order[::-1])):
                with self.subTest(target=target, order=direction):
                    r = self.ok(self.ctl("get", "", "--prefix", "--keys-only",
                                         "--sort-by", target, "--order", direction))
                    self.assertEqual(r.stdout, "".join(k + "\n\n" for k in seq))
            with self.subTest(target=target, order="default"):
                r = self.ok(self.ctl("get", "", "--prefix", "--keys-only", "--sort-by", target))
                self.assertEqual(r.stdout, "".join(k + "\n\n" for k in order))

    def test_order_without_sort_by(self):
        self.ok(self.ctl("get", "", "--prefix", "--keys-only", "--order", "DESCEND"),
                "z\n\ny\n\nx\n\n")
        self.ok(self.ctl("get", "", "--prefix", "--keys-only", "--order", "ASCEND"),
                "x\n\ny\n\nz\n\n")

    def test_sort_with_limit(self):
        # etcd sorts the whole range, then applies the limit
        self.ok(self.ctl("get", "", "--prefix", "--keys-only", "--sort-by", "VALUE",
                         "--limit", "2"), "y\n\nx\n\n")
        self.ok(self.ctl("get", "", "--prefix", "--keys-only", "--sort-by", "MODIFY",
                         "--order", "DESCEND", "--limit", "1"), "y\n\n")

    def test_bad_sort_flags(self):
        self.fails(self.ctl("get", "x", "--sort-by", "bogus"), "bad sort target bogus", rc=4)
        self.fails(self.ctl("get", "x", "--order", "bogus"), "bad sort order bogus", rc=4)


class OutputFormats(Base):
    def setUp(self):
        super().setUp()
        self.put("a", "1")
        self.put("b", "2")
        self.put("a", "11")

    def test_json(self):
        j = self.json("get", "", "--prefix")
        h = j["header"]
        self.assertEqual(sorted(h), ["cluster_id", "member_id", "raft_term", "revision"])
        self.assertEqual(h["revision"], 4)
        self.assertEqual(j["kvs"], [
            {"key": b64("a"), "create_revision": 2, "mod_revision": 4, "version": 2,
             "value": b64("11")},
            {"key": b64("b"), "create_revision": 3, "mod_revision": 3, "version": 1,
             "value": b64("2")}])
        self.assertEqual(j["count"], 2)
        self.assertEqual(sorted(j), ["count", "header", "kvs"])
        j = self.json("put", "c", "3")
        self.assertEqual(sorted(j), ["header"])
        self.assertEqual(j["header"]["revision"], 5)
        j = self.json("get", "nothing")
        self.assertEqual(sorted(j), ["header"])

    def test_fields(self):
        r = self.ok(self.ctl("get", "a", "-w", "fields"))
        lines = r.stdout.splitlines()
        self.assertRegex(lines[0], r'^"ClusterID" : \d+$')
        self.assertRegex(lines[1], r'^"MemberID" : \d+$')
        self.assertRegex(lines[3], r'^"RaftTerm" : \d+$')
        self.assertEqual(lines[2:3] + lines[4:], [
            '"Revision" : 4', '"Key" : "a"', '"CreateRevision" : 2', '"ModRevision" : 4',
            '"Version" : 2', '"Value" : "11"', '"Lease" : 0', '"More" : false',
            '"Count" : 1'])
        r = self.ok(self.ctl("put", "a", "3", "-w", "fields"))
        self.assertEqual(r.stdout.splitlines()[2], '"Revision" : 5')
        self.assertEqual(len(r.stdout.splitlines()), 4)

    def test_protobuf(self):
        from etcd3.etcdrpc import rpc_pb2
        r = self.ctl("get", "", "--prefix", "-w", "protobuf")
        self.assertEqual((r.rc, r.err), (0, b""))
        m = rpc_pb2.RangeResponse()
        m.ParseFromString(r.out)
        self.assertEqual(m.header.revision, 4)
        self.assertNotEqual(m.header.cluster_id, 0)
        self.assertNotEqual(m.header.member_id, 0)
        self.assertEqual(m.count, 2)
        self.assertEqual([(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version)
                          for kv in m.kvs],
                         [(b"a", b"11", 2, 4, 2), (b"b", b"2", 3, 3, 1)])

    def test_simple(self):
        self.ok(self.ctl("get", "", "--prefix", "-w", "simple"), "a\n11\nb\n2\n")

    def test_hex(self):
        self.ok(self.ctl("get", "a", "--hex"), "\\x61\n\\x31\\x31\n")


class Delete(Base):
    def setUp(self):
        super().setUp()
        for k in ("d/a", "d/b", "d/c", "e", "f"):
            self.put(k, "v" + k)

    def test_del_one(self):
        self.ok(self.ctl("del", "e"), "1\n")
        self.ok(self.ctl("del", "e"), "0\n")
        self.ok(self.ctl("get", "e"), "")

    def test_del_prev_kv(self):
        self.ok(self.ctl("del", "e", "--prev-kv"), "1\ne\nve\n")
        self.ok(self.ctl("del", "d/", "--prefix", "--prev-kv"),
                "3\nd/a\nvd/a\nd/b\nvd/b\nd/c\nvd/c\n")

    def test_del_prefix(self):
        self.ok(self.ctl("del", "d/", "--prefix"), "3\n")
        self.ok(self.ctl("get", "", "--prefix", "--keys-only"), "e\n\nf\n\n")

    def test_del_from_key(self):
        self.ok(self.ctl("del", "d/b", "--from-key"), "4\n")
        self.ok(self.ctl("get", "", "--prefix", "--keys-only"), "d/a\n\n")

    def test_del_range(self):
        self.ok(self.ctl("del", "d/b", "f"), "3\n")
        self.ok(self.ctl("get", "", "--prefix", "--keys-only"), "d/a\n\nf\n\n")

    def test_del_revisions(self):
        j = self.json("del", "d/", "--prefix")
        self.assertEqual(j["deleted"], 3)
        self.assertEqual(j["header"]["revision"], 7)   # one revision for the whole delete
        j = self.json("del", "nothing")
        self.assertEqual(j["header"]["revision"], 7)   # deleting nothing: no new revision
        self.assertNotIn("deleted", j)


TXN_PROMPTS = ("compares:\nsuccess requests (get, put, del):\n"
               "failure requests (get, put, del):\n")


class Txn(Base):
    def setUp(self):
        super().setUp()
        self.put("a", "1")   # rev 2
        self.put("b", "2")   # rev 3

    def txn(self, text, *args):
        return self.ctl("txn", "-i", *args, stdin=text)

    def test_success_branch(self):
        r = self.ok(self.txn('value("a") = "1"\n\nput x y\nget a\n\ndel b\n\n'))
        self.assertEqual(r.stdout, TXN_PROMPTS + "SUCCESS\n\nOK\n\na\n1\n")
        self.ok(self.ctl("get", "x"), "x\ny\n")
        self.ok(self.ctl("get", "b"), "b\n2\n")

    def test_not_interactive(self):
        r = self.ok(self.ctl("txn", stdin='value("a") = "1"\n\nput x y\nget a\n\ndel b\n\n'))
        self.assertEqual(r.stdout, "SUCCESS\n\nOK\n\na\n1\n")
        r = self.ok(self.ctl("txn", stdin='mod("a") > "2"\n\nput x y\n\nget a --print-value-only'
                                          '\n\n'))
        self.assertEqual(r.stdout, "FAILURE\n\na\n1\n")

    def test_failure_branch(self):
        r = self.ok(self.txn('value("a") = "2"\n\nput x y\n\ndel b\nget a\n\n'))
        self.assertEqual(r.stdout, TXN_PROMPTS + "FAILURE\n\n1\n\na\n1\n")
        self.ok(self.ctl("get", "x"), "")
        self.ok(self.ctl("get", "b"), "")

    def test_compare_targets(self):
        # a: create 2, mod 2, version 1, value "1"
        cases = [('value("a") = "1"', True), ('value("a") != "1"', False),
                 ('value("a") > "0"', True), ('value("a") < "0"', False),
                 ('version("a") = "1"', True), ('version("a") > "1"', False),
                 ('create("a") = "2"', True), ('create("a") < "2"', False),
                 ('mod("a") = "2"', True), ('mod("a") > "2"', False),
                 ('mod("b") = "3"', True),
                 ('version("missing") = "0"', True), ('create("missing") = "0"', True),
                 ('value("missing") = ""', False)]
        for cmp, want in cases:
            with self.subTest(compare=cmp):
                r = self.ok(self.txn(cmp + "\n\nget a\n\nget b\n\n"))
                self.assertEqual(r.stdout.split("\n")[3], "SUCCESS" if want else "FAILURE")

    def test_multiple_compares_and_json(self):
        r = self.ok(self.txn('value("a") = "1"\nmod("b") = "3"\n\nput a 9\nget a\n\n\n',
                             "-w", "json"))
        self.assertTrue(r.stdout.startswith(TXN_PROMPTS))
        j = json.loads(r.stdout[len(TXN_PROMPTS):])
        self.assertTrue(j["succeeded"])
        self.assertEqual(j["header"]["revision"], 4)
        self.assertEqual(j["responses"], [
            {"Response": {"ResponsePut": {"header": {"revision": 4}}}},
            {"Response": {"ResponseRange": {"header": {"revision": 4}, "kvs": [
                {"key": b64("a"), "create_revision": 2, "mod_revision": 4, "version": 2,
                 "value": b64("9")}], "count": 1}}}])

    def test_empty_txn(self):
        r = self.ok(self.txn("\n\n\n"))
        self.assertEqual(r.stdout, TXN_PROMPTS + "SUCCESS\n")
        self.assertEqual(self.rev(), 3)

    def test_range_ops_in_txn(self):
        r = self.ok(self.txn('\nget "" --prefix\ndel a --prev-kv\n\n\n'))
        self.assertEqual(r.stdout, TXN_PROMPTS + "SUCCESS\n\na\n1\nb\n2\n\n1\na\n1\n")

    def test_duplicate_key(self):
        r = self.txn('\nput x 1\nput x 2\n\n\n')
        self.assertEqual(r.rc, 1)
        self.assertEqual(r.stdout, TXN_PROMPTS)
        self.assertEqual(r.stderr.splitlines()[-1],
                         "Error: etcdserver: duplicate key given in txn request")

    def test_too_many_ops(self):
        ops = "".join("put k%d v\n" % i for i in range(129))
        r = self.txn("\n" + ops + "\n\n")
        self.assertEqual(r.rc, 1)
        self.assertEqual(r.stderr.splitlines()[-1],
                         "Error: etcdserver: too many operations in txn request")
        ops = "".join("put k%d v\n" % i for i in range(128))
        self.ok(self.txn("\n" + ops + "\n\n"))
        self.assertEqual(self.rev(), 4)

    def test_malformed(self):
        r = self.txn("bogus\n")
        self.assertEqual((r.rc, r.stdout), (3, "compares:\n"))
        self.assertEqual(r.stderr, "Error: malformed comparison: bogus\n")


class Compaction(Base):
    def setUp(self):
        super().setUp()
        for i in range(1, 6):
            self.put("c", str(i))       # revs 2..6
        self.put("other", "x")          # rev 7

    def check_compacted(self, at):
        self.fails(self.ctl("get", "c", "--rev", str(at - 1)),
                   "etcdserver: mvcc: required revision has been compacted")
        self.ok(self.ctl("get", "c", "--rev", str(at)), "c\n%d\n" % (at - 1))
        self.ok(self.ctl("get", "c"), "c\n5\n")

    def test_compaction(self):
        self.ok(self.ctl("compaction", "4"), "compacted revision 4\n")
        self.check_compacted(4)
        self.fails(self.ctl("compaction", "4"),
                   "etcdserver: mvcc: required revision has been compacted")
        self.fails(self.ctl("compaction", "3"),
                   "etcdserver: mvcc: required revision has been compacted")
        self.fails(self.ctl("compaction", "8"),
                   "etcdserver: mvcc: required revision is a future revision")
        self.ok(self.ctl("compaction", "7"), "compacted revision 7\n")
        self.ok(self.ctl("get", "", "--prefix"), "c\n5\nother\nx\n")
        self.assertEqual(self.rev(), 7)   # compaction does not create a revision

    def test_compaction_physical(self):
        self.ok(self.ctl("compaction", "5", "--physical"), "compacted revision 5\n")
        self.check_compacted(5)
        self.put("c", "6")
        self.ok(self.ctl("get", "c", "--rev", "6"), "c\n5\n")

    def test_compacted_revision_survives_restart(self):
        self.ok(self.ctl("compaction", "5", "--physical"), "compacted revision 5\n")
        self.s.restart()
        self.check_compacted(5)


class Endpoint(Base):
    def test_health(self):
        r = self.ctl("endpoint", "health")
        self.assertEqual((r.rc, r.stdout), (0, ""))
        self.assertRegex(r.stderr, r"^%s is healthy: successfully committed proposal: "
                         r"took = [0-9.]+[µnm]?s\n$" % re.escape(self.s.endpoint))
        j = self.json("endpoint", "health")
        self.assertEqual(len(j), 1)
        self.assertEqual((j[0]["endpoint"], j[0]["health"]), (self.s.endpoint, True))

    def test_status(self):
        self.put("a", "1")
        r = self.ok(self.ctl("endpoint", "status"))
        cols = r.stdout.rstrip("\n").split(", ")
        self.assertEqual(len(cols), 10, r.stdout)
        self.assertEqual(cols[0], self.s.endpoint)
        self.assertRegex(cols[1], r"^[0-9a-f]{1,16}$")
        self.assertRegex(cols[2], r"^\d+\.\d+\.\d+$")
        self.assertRegex(cols[3], r"^\d+(\.\d+)? [kMG]?B$")
        self.assertEqual(cols[4:6], ["true", "false"])
        self.assertEqual(cols[9], "")
        j = self.json("endpoint", "status")
        st = j[0]["Status"]
        self.assertEqual(j[0]["Endpoint"], self.s.endpoint)
        self.assertEqual(st["header"]["revision"], 2)
        self.assertEqual(st["leader"], st["header"]["member_id"])
        self.assertEqual(int(cols[1], 16), st["header"]["member_id"])
        self.assertGreater(st["dbSize"], 0)
        self.assertGreater(st["raftIndex"], 0)
        self.assertGreaterEqual(st["raftIndex"], st["raftAppliedIndex"])
        self.assertGreater(st["raftTerm"], 0)


class Limits(Base):
    def test_large_value_near_limit(self):
        big = b"v" * 1500000
        self.ok(self.ctl("put", "big", stdin=big), "OK\n")
        r = self.ctl("get", "big", "--print-value-only")
        self.assertEqual((r.rc, r.err), (0, b""))
        self.assertEqual(r.out, big + b"\n")
        # the largest value etcd 3.4 accepts with its default --max-request-bytes
        self.ok(self.ctl("put", "big2", stdin=b"w" * 1572800), "OK\n")

    def test_value_over_max_request_bytes(self):
        for n in (1572850, 1600000, 2000000):
            with self.subTest(size=n):
                self.fails(self.ctl("put", "big", stdin=b"v" * n),
                           "etcdserver: request is too large")
        self.assertTrue(self.s.alive())
        self.ok(self.ctl("get", "big"), "")
        self.put("after", "ok")

    def test_long_keys_ordered(self):
        base = "L" * 1000
        # around LMDB's 511-byte key limit and far beyond it, with shared long prefixes,
        # keys that are prefixes of others, and differences only at the very end
        keys = [base + s for s in ("", "a", "b", "a" * 600 + "x", "a" * 600 + "y",
                                   "a" * 3000, "\x01", "\x7f", "b" + "z" * 2000)]
        keys += ["L" * n for n in (509, 510, 511, 512, 513, 999, 1001)]
        keys += ["M" + "q" * 5000]
        for i, k in enumerate(keys):
            self.put(k, "v%d" % i)
        want = sorted(keys, key=lambda k: k.encode())
        r = self.ok(self.ctl("get", "L", "--prefix", "--keys-only"))
        self.assertEqual(r.stdout.split("\n\n")[:-1], [k for k in want if k.startswith("L")])
        r = self.ok(self.ctl("get", "", "--prefix", "--keys-only", "--order", "DESCEND"))
        self.assertEqual(r.stdout.split("\n\n")[:-1], want[::-1])
        r = self.ok(self.ctl("get", base, "--prefix", "--keys-only"))
        self.assertEqual(r.stdout.split("\n\n")[:-1], [k for k in want if k.startswith(base)])
        # point get, range between two long keys, delete by long prefix
        self.ok(self.ctl("get", keys[5], "--print-value-only"), "v5\n")
        r = self.ok(self.ctl("get", keys[3], keys[4], "--keys-only"))
        self.assertEqual(r.stdout, keys[3] + "\n\n")
        self.ok(self.ctl("del", base + "a" * 600, "--prefix"), "3\n")
        r = self.ok(self.ctl("get", "L", "--prefix", "--keys-only"))
        self.assertEqual(r.stdout.split("\n\n")[:-1],
                         [k for k in want if k.startswith("L")
                          and not k.startswith(base + "a" * 600)])


class Persistence(Base):
    def snapshot(self):
        return (self.json("get", "", "--prefix")["kvs"], self.rev())

    def test_restart(self):
        for i in range(20):
            self.put("k%02d" % i, "v%d" % i)
        self.ok(self.ctl("del", "k1", "--prefix"), "10\n")
        self.put("k05", "again")
        self.ok(self.ctl("txn", "-i", stdin="\n\nput t 1\nput u 2\n\n\n"))
        before = self.snapshot()
        self.s.restart()
        self.assertEqual(self.snapshot(), before)
        self.ok(self.ctl("get", "k05", "--rev", "7"), "k05\nv5\n")
        self.put("new", "1")
        self.assertEqual(self.rev(), before[1] + 1)
        self.s.restart()
        self.ok(self.ctl("get", "new"), "new\n1\n")

    def test_kill9_acknowledged_writes_survive(self):
        import etcd3
        acked = {}
        lock = threading.Lock()
        stop = threading.Event()

        def grpc_writer(tid):
            c = etcd3.client(host="127.0.0.1", port=self.s.client_port, timeout=5)
            i = 0
            while not stop.is_set():
                k = "crash/g%d/%06d" % (tid, i)
                try:
                    c.put(k, "val-%s" % k)
                except Exception:  # noqa: the server is gone
                    return
                with lock:
                    acked[k] = "val-%s" % k
                i += 1

        def ctl_writer():
            i = 0
            while not stop.is_set():
                k = "crash/ctl/%06d" % i
                try:
                    r = self.ctl("put", k, "val-" + k, timeout=10)
                except Exception:  # noqa
                    return
                if r.rc != 0 or r.stdout != "OK\n":
                    return
                with lock:
                    acked[k] = "val-" + k
                i += 1

        threads = [threading.Thread(target=grpc_writer, args=(t,)) for t in range(4)]
        threads.append(threading.Thread(target=ctl_writer))
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with lock:
                    if len(acked) >= 300:
                        break
                time.sleep(0.05)
            time.sleep(0.3)
            self.s.kill9()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        with lock:
            acked = dict(acked)
        self.assertGreater(len(acked), 50, "too few writes acknowledged before the kill")
        self.s.restart()
        j = self.json("get", "crash/", "--prefix")
        found = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
                 for kv in j.get("kvs", [])}
        missing = [k for k in acked if found.get(k) != acked[k]]
        self.assertEqual(missing[:20], [], "%d of %d acknowledged puts lost after kill -9" % (
            len(missing), len(acked)))
        # revisions stay dense: one revision per put that made it
        self.assertEqual(j["header"]["revision"], 1 + len(found))
        self.put("after-crash", "1")


class HttpEndpoints(unittest.TestCase):
    """/health, /version, /metrics on the client port and on --listen-metrics-urls."""

    def setUp(self):
        self.mport = harness.free_port()
        self.s = harness.fresh_server(self, extra_args=[
            "--listen-metrics-urls", "http://127.0.0.1:%d" % self.mport])

    def get(self, port, path):
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()

    def check_metrics(self, port):
        st, ctype, body = self.get(port, "/metrics")
        self.assertEqual(st, 200)
        self.assertTrue(ctype.startswith("text/plain"), ctype)
        self.assertIn("# TYPE ", body)
        self.assertIn("etcd_server_has_leader 1", body.splitlines())

    def test_client_port(self):
        self.assertEqual(self.get(self.s.client_port, "/health")[::2], (200, '{"health":"true"}'))
        st, ctype, body = self.get(self.s.client_port, "/version")
        self.assertEqual(st, 200)
        v = json.loads(body)
        self.assertEqual(sorted(v), ["etcdcluster", "etcdserver"])
        self.assertRegex(v["etcdserver"], r"^\d+\.\d+\.\d+$")
        self.assertRegex(v["etcdcluster"], r"^\d+\.\d+\.0$")
        self.check_metrics(self.s.client_port)

    def test_metrics_disk_histograms(self):
        """etcd's names and Prometheus histogram form: the commit that makes a put durable is
        in etcd_disk_wal_fsync_duration_seconds and etcd_disk_backend_commit_duration_seconds;
        a lone member leads, and saw one leader change."""
        def sample(body, name):
            for line in body.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
            return None
        before = self.get(self.s.client_port, "/metrics")[2]
        for i in range(5):
            self.assertEqual(self.s.ctl("put", "m%d" % i, "v").rc, 0)
        body = self.get(self.s.client_port, "/metrics")[2]
        self.assertEqual(sample(body, "etcd_server_is_leader"), 1)
        self.assertEqual(sample(body, "etcd_server_leader_changes_seen_total"), 1)
        # Raft's commit index moved with the puts; nothing is left pending or failed
        self.assertGreaterEqual(sample(body, "etcd_server_proposals_committed_total")
                                - sample(before, "etcd_server_proposals_committed_total"), 5)
        self.assertGreaterEqual(sample(body, "etcd_server_proposals_committed_total"),
                                sample(body, "etcd_server_proposals_applied_total"))
        self.assertEqual(sample(body, "etcd_server_proposals_pending"), 0)
        self.assertEqual(sample(body, "etcd_server_proposals_failed_total"), 0)
        for h in ("etcd_disk_wal_fsync_duration_seconds", "etcd_disk_backend_commit_duration_seconds"):
            self.assertIn("# TYPE %s histogram" % h, body)
            buckets = [line for line in body.splitlines() if line.startswith(h + "_bucket{")]
            self.assertEqual(len(buckets), 15, buckets)  # 14 of etcd's + Inf
            self.assertEqual(buckets[0].split()[0], h + '_bucket{le="0.001"}')
            self.assertEqual(buckets[-1].split()[0], h + '_bucket{le="+Inf"}')
            counts = [float(x.split()[1]) for x in buckets]
            self.assertEqual(counts, sorted(counts))  # cumulative
            self.assertEqual(counts[-1], sample(body, h + "_count"))
            self.assertGreaterEqual(sample(body, h + "_count") - (sample(before, h + "_count") or 0), 5)
            self.assertGreater(sample(body, h + "_sum"), 0)

    def test_metrics_port(self):
        self.assertEqual(self.get(self.mport, "/health")[::2], (200, '{"health":"true"}'))
        self.check_metrics(self.mport)


class HealthAlarms(unittest.TestCase):
    """/health as etcd 3.4: 503 and false while an alarm is raised, ?exclude= lets it pass."""

    def raw(self, port, path):
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def test_nospace_against_etcd(self):
        sut, etcd = harness.pair_for_test(self, extra_args=["--quota-backend-bytes", "200000"])
        value = "x" * 8000
        paths = ["/health", "/health?exclude=NOSPACE", "/health?exclude=CORRUPT",
                 "/health?exclude=CORRUPT&exclude=NOSPACE", "/health?exclude=NOSPACEX"]
        for s in (sut, etcd):
            for i in range(200):
                if s.ctl("put", "k%d" % i, value).rc != 0:
                    break
            self.assertIn("alarm:NOSPACE", s.ctl("alarm", "list").stdout, s.label)
        got = [[self.raw(s.client_port, p) for p in paths] for s in (sut, etcd)]
        self.assertEqual(got[0], got[1])
        self.assertEqual(got[0][0], (503, '{"health":"false"}\n'))
        self.assertEqual(got[0][1], (200, '{"health":"true"}'))
        for s in (sut, etcd):
            s.ctl("alarm", "disarm")
        self.assertEqual([self.raw(s.client_port, "/health") for s in (sut, etcd)],
                         [(200, '{"health":"true"}')] * 2)


class QuotaExcludesRaftLog(unittest.TestCase):
    """--quota-backend-bytes measures the keyspace's store, as etcd's does its bbolt file:
    Keelson's Raft log shares the LMDB file but is not counted (it was: 1,378 of these puts
    went in before NOSPACE, where etcd takes them all)."""

    def test_overwrites_fit_as_on_etcd(self):
        import etcd3
        sut, etcd = harness.pair_for_test(self, extra_args=["--quota-backend-bytes", "4000000"])
        value = "x" * 1000
        for s in (sut, etcd):
            c = etcd3.client(host="127.0.0.1", port=s.client_port, timeout=10)
            for i in range(2000):
                c.put("k%d" % (i % 20), value)
            self.assertEqual(s.ctl("alarm", "list").stdout.strip(), "", s.label)


class PythonClient(Base):
    """python3-etcd3 (Debian) basics."""

    def client(self):
        import etcd3
        return etcd3.client(host="127.0.0.1", port=self.s.client_port, timeout=10)

    def test_put_get_delete(self):
        c = self.client()
        resp = c.put("py/a", "1")
        self.assertEqual(resp.header.revision, 2)
        val, meta = c.get("py/a")
        self.assertEqual(val, b"1")
        self.assertEqual((meta.key, meta.create_revision, meta.mod_revision, meta.version),
                         (b"py/a", 2, 2, 1))
        self.assertEqual(c.get("py/none"), (None, None))
        c.put("py/b", "2")
        c.put("py/c", b"\x00\xff")
        self.assertEqual([(v, m.key) for v, m in c.get_prefix("py/")],
                         [(b"1", b"py/a"), (b"2", b"py/b"), (b"\x00\xff", b"py/c")])
        self.assertEqual([m.key for v, m in c.get_prefix("py/", sort_order="descend")],
                         [b"py/c", b"py/b", b"py/a"])
        self.assertTrue(c.delete("py/a"))
        self.assertFalse(c.delete("py/a"))
        self.assertEqual(len(list(c.get_all())), 2)
        resp = c.delete_prefix("py/")
        self.assertEqual(resp.deleted, 2)
        self.assertEqual(list(c.get_all()), [])

    def test_transaction(self):
        c = self.client()
        c.put("t/a", "1")
        ok, resps = c.transaction(
            compare=[c.transactions.value("t/a") == "1", c.transactions.version("t/a") > 0],
            success=[c.transactions.put("t/b", "2"), c.transactions.get("t/a")],
            failure=[c.transactions.delete("t/a")])
        self.assertTrue(ok)
        self.assertEqual(len(resps), 2)
        self.assertEqual([(v, m.key) for v, m in resps[1]], [(b"1", b"t/a")])
        ok, resps = c.transaction(
            compare=[c.transactions.mod("t/b") < 3],
            success=[c.transactions.put("t/c", "3")],
            failure=[c.transactions.delete("t/a")])
        self.assertFalse(ok)
        self.assertEqual(c.get("t/a"), (None, None))
        self.assertEqual(c.get("t/b")[0], b"2")
        self.assertTrue(c.replace("t/b", "2", "22"))
        self.assertFalse(c.replace("t/b", "2", "23"))

    def test_status(self):
        st = self.client().status()
        self.assertRegex(st.version, r"^\d+\.\d+\.\d+$")
        self.assertEqual(st.leader.id, st.leader.id)
        self.assertGreater(st.db_size, 0)

    def test_range_options_over_grpc(self):
        """RangeRequest fields etcdctl 3.4 cannot send (count_only, revision filters)."""
        from etcd3.etcdrpc import rpc_pb2
        c = self.client()
        for i in range(5):
            c.put("r/%d" % i, "v" * i)
        c.put("r/1", "again")    # rev 7
        kv = c.kvstub
        r = kv.Range(rpc_pb2.RangeRequest(key=b"r/", range_end=b"r0", count_only=True))
        self.assertEqual((r.count, len(r.kvs), r.more), (5, 0, False))
        r = kv.Range(rpc_pb2.RangeRequest(key=b"r/", range_end=b"r0", limit=2))
        self.assertEqual((r.count, len(r.kvs), r.more), (5, 2, True))
        r = kv.Range(rpc_pb2.RangeRequest(key=b"r/", range_end=b"r0", min_mod_revision=5))
        self.assertEqual([x.key for x in r.kvs], [b"r/1", b"r/3", b"r/4"])
        r = kv.Range(rpc_pb2.RangeRequest(key=b"r/", range_end=b"r0", max_create_revision=3))
        self.assertEqual([x.key for x in r.kvs], [b"r/0", b"r/1"])
        r = kv.Range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True))
        self.assertEqual([(x.key, x.value) for x in r.kvs],
                         [(b"r/%d" % i, b"") for i in range(5)])
        r = kv.Range(rpc_pb2.RangeRequest(key=b"r/1", serializable=True))
        self.assertEqual([x.value for x in r.kvs], [b"again"])


if __name__ == "__main__":
    unittest.main()
