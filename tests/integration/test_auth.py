"""Auth against the real etcd 3.4: the same etcdctl user/role/auth commands, and requests as
different users, sent to Keelson and to etcd; outputs, errors and exit codes must match."""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
from test_differential import Pair  # noqa: E402


class AuthDifferential(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        sut, oracle = harness.pair_for_test(self)
        self.p = Pair(sut, oracle)

    def check(self):
        msg = self.p.report(self.id().split(".")[-1])
        if msg:
            self.fail(msg)

    def test_users_roles_permissions(self):
        p = self.p
        p.run("auth", "enable")                       # no root user yet
        p.run("user", "add", "root:rootpw")
        p.run("user", "add", "root:again")            # exists
        p.run("role", "add", "reader")
        p.run("role", "add", "reader")                # exists
        p.run("role", "add", "app")
        p.run("role", "grant-permission", "reader", "read", "/cfg/", "--prefix=true")
        p.run("role", "grant-permission", "app", "readwrite", "/app/", "--prefix=true")
        p.run("role", "grant-permission", "app", "write", "single")
        p.run("role", "grant-permission", "nosuch", "read", "x")
        p.run("user", "add", "alice:apw")
        p.run("user", "add", "bob:bpw")
        p.run("user", "grant-role", "alice", "app")
        p.run("user", "grant-role", "bob", "reader")
        p.run("user", "grant-role", "bob", "nosuch")
        p.run("user", "grant-role", "nobody", "app")
        p.run("role", "get", "app")
        p.run("role", "list")
        p.run("user", "list")
        p.run("user", "get", "alice")
        p.run("auth", "enable")                       # root lacks the root role
        p.run("user", "grant-role", "root", "root")
        p.run("auth", "enable")
        p.run("put", "/app/x", "1")                   # no user
        p.run("--user", "alice:wrong", "put", "/app/x", "1")
        p.run("--user", "alice:apw", "put", "/app/x", "1")
        p.run("--user", "alice:apw", "put", "single", "1")
        p.run("--user", "alice:apw", "get", "single")  # write-only
        p.run("--user", "alice:apw", "put", "/cfg/a", "1")
        p.run("--user", "root:rootpw", "put", "/cfg/a", "v")
        p.run("--user", "bob:bpw", "get", "/cfg/", "--prefix")
        p.run("--user", "bob:bpw", "get", "/app/", "--prefix")
        p.run("--user", "bob:bpw", "put", "/cfg/b", "1")
        p.run("--user", "alice:apw", "get", "/app/", "--prefix")
        p.run("--user", "alice:apw", "user", "list")  # not root
        # Snapshot wants root too; etcdctl's log lines race its goroutines, so only the exit
        # status and the final error line are compared
        for user in ([], ["--user", "alice:apw"]):
            got = []
            for srv in (p.sut, p.oracle):
                r = harness.etcdctl(srv.endpoint, *user, "snapshot", "save",
                                    os.path.join(srv.tmp, "refused.db"))
                got.append((r.rc, r.stderr.strip().splitlines()[-1:]))
            self.assertEqual(got[0], got[1], "snapshot save %r: keelson vs etcd" % user)
        p.run("--user", "root:rootpw", "user", "revoke-role", "root", "root")
        p.run("--user", "root:rootpw", "user", "delete", "root")
        p.run("--user", "root:rootpw", "role", "revoke-permission", "app", "/app/", "/app0")
        p.run("--user", "alice:apw", "get", "/app/x")
        p.run("--user", "root:rootpw", "user", "passwd", "bob", "--interactive=false", stdin="newpw\n")
        p.run("--user", "bob:bpw", "get", "/cfg/a")
        p.run("--user", "bob:newpw", "get", "/cfg/a")
        p.run("--user", "root:rootpw", "role", "delete", "reader")
        p.run("--user", "root:rootpw", "user", "get", "bob")
        p.run("--user", "root:rootpw", "auth", "disable")
        p.run("get", "/cfg/a")
        self.check()


if __name__ == "__main__":
    unittest.main()
