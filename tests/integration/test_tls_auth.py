"""TLS and auth together, against the real etcd 3.4 with the same flags: every etcdctl
Maintenance and Auth command over TLS with --user, a permission matrix, refused clients (no
certificate, wrong CA, revoked certificate), the certificate CN as the user, JWT tokens,
--auto-tls, --cipher-suites and --config-file.

Certificates are made here with the `openssl` command in a temp dir (EC P-256: fast)."""

import base64
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import normalize  # noqa: E402
from test_differential import Pair  # noqa: E402

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def sh(*argv, cwd=None, stdin=None):
    p = subprocess.run(list(argv), cwd=cwd, input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("%r failed: %s" % (argv, p.stderr.decode(errors="replace")))
    return p.stdout


class PKI:
    """A CA with a server certificate for 127.0.0.1, client certificates by CN, a CRL, and a
    second CA that the servers do not trust."""

    CA_CNF = """
[ ca ]
default_ca = local
[ local ]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
crlnumber = {dir}/crlnumber
default_md = sha256
default_crl_days = 30
policy = anything
[ anything ]
commonName = supplied
[ server_ext ]
subjectAltName = IP:127.0.0.1
extendedKeyUsage = serverAuth
[ client_ext ]
extendedKeyUsage = clientAuth
"""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="keelson-it-pki-")
        d = self.dir
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write(self.CA_CNF.format(dir=d))
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "crlnumber"), "w") as f:
            f.write("01\n")
        for ca in ("ca", "evil"):
            self._key(ca)
            sh(OPENSSL, "req", "-x509", "-new", "-key", self.p(ca + ".key"), "-days", "2",
               "-subj", "/CN=keelson-test-" + ca, "-out", self.p(ca + ".crt"))
        self.issue("server", "server_ext")
        for cn in ("root", "alice", "bob", "revoked", "nobody"):
            self.issue(cn, "client_ext")
        self.issue("evilroot", "client_ext", ca="evil", cn="root")
        sh(OPENSSL, "ca", "-batch", "-config", self.p("ca.cnf"), "-keyfile", self.p("ca.key"),
           "-cert", self.p("ca.crt"), "-revoke", self.p("revoked.crt"))
        sh(OPENSSL, "ca", "-batch", "-config", self.p("ca.cnf"), "-keyfile", self.p("ca.key"),
           "-cert", self.p("ca.crt"), "-gencrl", "-out", self.p("crl.pem"))

    def p(self, name):
        return os.path.join(self.dir, name)

    def _key(self, name):
        sh(OPENSSL, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", self.p(name + ".key"))

    def issue(self, name, ext, ca="ca", cn=None):
        self._key(name)
        sh(OPENSSL, "req", "-new", "-key", self.p(name + ".key"), "-subj", "/CN=" + (cn or name),
           "-out", self.p(name + ".csr"))
        sh(OPENSSL, "x509", "-req", "-in", self.p(name + ".csr"), "-CA", self.p(ca + ".crt"),
           "-CAkey", self.p(ca + ".key"), "-CAcreateserial", "-days", "2", "-extfile",
           self.p("ca.cnf"), "-extensions", ext, "-out", self.p(name + ".crt"))
        if ca == "ca":
            # record it in the CA's database so that `openssl ca -revoke` knows it
            serial = sh(OPENSSL, "x509", "-in", self.p(name + ".crt"), "-noout", "-serial").decode()
            serial = serial.strip().split("=")[1]
            end = sh(OPENSSL, "x509", "-in", self.p(name + ".crt"), "-noout", "-enddate").decode()
            end = time.strftime("%y%m%d%H%M%SZ", time.strptime(end.strip().split("=")[1],
                                                                  "%b %d %H:%M:%S %Y %Z"))
            with open(self.p("index.txt"), "a") as f:
                f.write("V\t%s\t\t%s\tunknown\t/CN=%s\n" % (end, serial, cn or name))

    def client(self, name):
        """etcdctl's TLS flags for a client certificate (None: no certificate)."""
        args = ["--cacert=" + self.p("ca.crt")]
        if name:
            args += ["--cert=" + self.p(name + ".crt"), "--key=" + self.p(name + ".key")]
        return args

    def server_flags(self, client_cert_auth=True, crl=False):
        f = ["--cert-file", self.p("server.crt"), "--key-file", self.p("server.key"),
             "--trusted-ca-file", self.p("ca.crt")]
        if client_cert_auth:
            f.append("--client-cert-auth")
        if crl:
            f += ["--client-crl-file", self.p("crl.pem")]
        return f

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


_pki = None


def pki():
    global _pki
    if _pki is None:
        _pki = PKI()
    return _pki


class TLSServer(harness.Server):
    """A server on an https client URL; etcdctl gets the CA and a client certificate."""

    def __init__(self, binary, tls_client=("root",), label=None, extra_args=(), scheme="https"):
        super().__init__(binary, extra_args=extra_args, label=label)
        self.scheme = scheme
        self.ctl_tls = pki().client(tls_client[0]) if tls_client else []

    @property
    def client_url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.client_port)

    def ctl(self, *args, **kw):
        return harness.etcdctl(self.endpoint, *(list(self.ctl_tls) + list(args)), **kw)

    def wait_healthy(self, timeout=harness.START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise harness.ServerError("%s exited with status %s during start-up\n%s" % (
                    self.label, self.proc.returncode, self.log_tail()))
            if self._port_open():
                try:
                    r = self.ctl("--dial-timeout=1s", "--command-timeout=2s", "endpoint", "health",
                                 timeout=10)
                    if r.rc == 0:
                        return
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() > deadline:
                raise harness.ServerTimeout("%s not healthy after %.0fs\n%s" % (
                    self.label, timeout, self.log_tail()))
            time.sleep(0.05)


def checked_cleanup(testcase, s):
    """Clean s up after the test; with KEELSON_SANITIZER_CHECK=1, fail on a sanitizer report."""
    def done():
        report = s.sanitizer_report() if os.environ.get("KEELSON_SANITIZER_CHECK") == "1" else ""
        s.cleanup()
        if report:
            raise AssertionError("sanitizer report from server:\n" + report)
    testcase.addCleanup(done)


def start_tls_pair(testcase, extra_args=(), tls_client=("root",), ctl_tls=None):
    """A Keelson and an etcd with the same TLS flags, both cleaned up after the test."""
    servers = [TLSServer(harness.KEELSON_BIN, tls_client, "sut", extra_args),
               TLSServer(harness.ETCD_BIN, tls_client, "etcd", extra_args)]
    for s in servers:
        if ctl_tls is not None:
            s.ctl_tls = list(ctl_tls)
    errors = []

    def go(s):
        try:
            s.start()
        except Exception as e:  # noqa
            errors.append("%s: %s" % (s.label, e))

    ts = [threading.Thread(target=go, args=(s,)) for s in servers]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for s in servers:
        checked_cleanup(testcase, s)
    if errors:
        raise harness.ServerError("; ".join(errors))
    return servers


def both(servers, *args, stdin=None):
    """The same etcdctl command to every server, in parallel; the results in order."""
    res = [None] * len(servers)

    def go(i):
        res[i] = servers[i].ctl(*args, stdin=stdin)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(servers))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return res


def shape(text):
    """Output with every number and hex id replaced: for outputs whose values legitimately
    differ between two stores (hashes, sizes, ids), the words must still match."""
    text = re.sub(r"\b[0-9a-f]{12,16}\b", "<ID>", text)
    return re.sub(r"\d+(\.\d+)?( ?[kMG]?B)?", "N", text)


class TLSAuthDifferential(unittest.TestCase):
    """Every Maintenance and Auth command with --cacert/--cert/--key and --user, against
    Keelson and etcd started with the same TLS flags (--client-cert-auth on)."""
    maxDiff = None

    def setUp(self):
        self.sut, self.etcd = start_tls_pair(self, pki().server_flags())
        self.p = Pair(self.sut, self.etcd)

    def check(self):
        msg = self.p.report(self.id().split(".")[-1])
        if msg:
            self.fail(msg)

    def test_auth_family(self):
        p = self.p
        p.run("user", "add", "root:rootpw")
        p.run("user", "add", "alice:apw")
        p.run("user", "add", "bob", "--new-user-password=bpw")
        p.run("user", "add", "carol:cpw")
        p.run("role", "add", "root")
        p.run("role", "add", "rw")
        p.run("role", "add", "ro")
        p.run("role", "grant-permission", "rw", "readwrite", "/a/", "--prefix=true")
        p.run("role", "grant-permission", "rw", "write", "k1", "k5")
        p.run("role", "grant-permission", "ro", "read", "/z", "--from-key=true")
        p.run("role", "grant-permission", "ro", "read", "solo")
        p.run("role", "grant-permission", "ro", "bogus", "solo")
        p.run("user", "grant-role", "root", "root")
        p.run("user", "grant-role", "alice", "rw")
        p.run("user", "grant-role", "bob", "ro")
        p.run("user", "grant-role", "bob", "rw")
        p.run("user", "grant-role", "carol", "none")
        p.run("auth", "enable")
        R = ("--user", "root:rootpw")
        p.run(*R, "user", "list")
        p.run(*R, "user", "get", "bob")
        p.run(*R, "user", "get", "bob", "--detail=true")
        p.run(*R, "user", "get", "nosuch")
        p.run(*R, "role", "list")
        p.run(*R, "role", "get", "rw")
        p.run(*R, "role", "get", "ro")
        p.run(*R, "role", "get", "root")
        p.run(*R, "role", "get", "nosuch")
        p.run(*R, "-w", "json", "role", "get", "ro")
        p.run(*R, "user", "revoke-role", "bob", "rw")
        p.run(*R, "user", "revoke-role", "bob", "rw")
        p.run(*R, "role", "revoke-permission", "ro", "/z", "--from-key=true")
        p.run(*R, "role", "revoke-permission", "ro", "/z", "--from-key=true")
        p.run(*R, "role", "revoke-permission", "rw", "/a/", "--prefix=true")
        p.run(*R, "role", "revoke-permission", "rw", "k1", "k5")
        p.run(*R, "role", "get", "rw")
        p.run(*R, "user", "passwd", "carol", "--interactive=false", stdin="c2\n")
        p.run("--user", "carol:cpw", "get", "x")
        p.run("--user", "carol:c2", "get", "x")
        p.run(*R, "user", "delete", "carol")
        p.run(*R, "user", "delete", "carol")
        p.run(*R, "role", "delete", "ro")
        p.run(*R, "role", "delete", "ro")
        p.run(*R, "user", "get", "bob")
        p.run("--user", "alice:apw", "user", "list")
        p.run("--user", "alice:apw", "auth", "disable")
        p.run(*R, "user", "delete", "root")
        p.run(*R, "role", "delete", "root")
        p.run(*R, "auth", "disable")
        p.run("user", "list")
        self.check()

    def test_maintenance_family(self):
        p = self.p
        p.run("put", "k", "v")
        p.run("user", "add", "root:rootpw")
        p.run("user", "add", "alice:apw")
        p.run("user", "grant-role", "root", "root")
        p.run("auth", "enable")
        R = ("--user=root:rootpw",)
        A = ("--user=alice:apw",)
        for who in (R, A):
            p.run(*who, "endpoint", "health")
            p.run(*who, "endpoint", "status")
        for cmd in (("alarm", "list"), ("alarm", "disarm"), ("defrag",)):
            p.run(*R, *cmd)
        # A non-root user: etcd 3.4 lets anyone list and disarm alarms and move the leader
        # (no auth check there), and refuses defrag and hashkv with the auth package's own
        # error ("Unknown: auth: ...").
        for cmd in (("alarm", "list"), ("alarm", "disarm")):
            p.run(*A, *cmd)
            p.run(*cmd)
        for cmd in (("defrag",), ("endpoint", "hashkv"), ("move-leader", "1")):
            a, b = both([self.sut, self.etcd], *A, *cmd)
            last = [r.stderr.strip().splitlines()[-1:] for r in (a, b)]
            last[0] = [x.replace(self.sut.endpoint, "<EP>") for x in last[0]]
            last[1] = [x.replace(self.etcd.endpoint, "<EP>") for x in last[1]]
            self.assertEqual((a.rc, last[0]), (b.rc, last[1]), cmd)
        self.check()
        # Values that differ between two stores (hashes, sizes, ids): same words and exit codes.
        for args in (R + ("endpoint", "hashkv"), R + ("-w", "json", "endpoint", "hashkv"),
                     R + ("move-leader", "1")):
            a, b = both([self.sut, self.etcd], *args)
            self.assertEqual(a.rc, b.rc, (args, a, b))
            na = normalize.normalize(list(args), a.rc, a.out, a.err, self.sut.endpoint)
            nb = normalize.normalize(list(args), b.rc, b.out, b.err, self.etcd.endpoint)
            self.assertEqual(shape(na[1].decode()), shape(nb[1].decode()), args)
            self.assertEqual(shape(na[2].decode()), shape(nb[2].decode()), args)
        # move-leader to the member itself (single member): etcd's answer for its own id
        for s in (self.sut, self.etcd):
            st = json.loads(s.ctl(*R, "-w", "json", "endpoint", "status").stdout)
            s.self_id = "%x" % st[0]["Status"]["header"]["member_id"]
        a, b = (normalize.normalize(["move-leader"], r.rc, r.out, r.err, s.endpoint)
                for s, r in ((s, s.ctl(*R, "move-leader", s.self_id)) for s in (self.sut, self.etcd)))
        self.assertEqual(shape(repr(a)), shape(repr(b)))
        # snapshot save (as root, R): each to its own file. A non-root user is refused on both
        # (test_auth compares that).
        outs = []
        for s in (self.sut, self.etcd):
            path = os.path.join(s.tmp, "snap.db")
            r = s.ctl(*R, "snapshot", "save", path)
            self.assertEqual(r.rc, 0, r)
            self.assertGreater(os.path.getsize(path), 0)
            outs.append(r.stdout.replace(path, "<PATH>"))
        self.assertEqual(outs[0], outs[1])


class PermissionMatrix(unittest.TestCase):
    """Each role and range against get, put, del, txn and watch, as the role's user, on both
    servers; the outcomes must agree."""

    RANGES = [  # role name, grant-permission arguments
        ("single", ["readwrite", "key1"]),
        ("span", ["readwrite", "key1", "key5"]),
        ("prefix", ["readwrite", "key", "--prefix=true"]),
        ("fromkey", ["readwrite", "key3", "--from-key=true"]),
        ("ronly", ["read", "key", "--prefix=true"]),
        ("wonly", ["write", "key", "--prefix=true"]),
    ]
    OPS = [
        ("get", "key1"), ("get", "key4"), ("get", "key1", "key3"), ("get", "key", "--prefix"),
        ("get", "key3", "--from-key"), ("get", "other"),
        ("put", "key1", "v"), ("put", "key4", "v"), ("put", "key9", "v"), ("put", "other", "v"),
        ("del", "key1"), ("del", "key1", "key3"), ("del", "key", "--prefix"),
        ("del", "key4", "--from-key"),
    ]
    TXNS = [
        'value("key1") = "v"\n\nput key2 x\n\nget other\n\n',
        'mod("key1") > "0"\n\nget key1\n\nput key4 y\n\n',
        '\n\nput key1 z\ndel key2\n\n\n',
    ]

    def test_matrix(self):
        sut, etcd = start_tls_pair(self, pki().server_flags())
        p = Pair(sut, etcd)
        p.run("user", "add", "root:rootpw")
        p.run("user", "grant-role", "root", "root")
        for role, perm in self.RANGES:
            p.run("role", "add", role)
            p.run("role", "grant-permission", role, *perm)
            p.run("user", "add", "u-%s:pw" % role)
            p.run("user", "grant-role", "u-%s" % role, role)
        p.run("auth", "enable")
        for role, _ in self.RANGES:
            who = ("--user", "u-%s:pw" % role)
            for op in self.OPS:
                if op[0] == "del":
                    p.run("--user", "root:rootpw", "put", "key1", "v")  # what dels removed
                p.run(*who, *op)
            for t in self.TXNS:
                p.txn(t, *who)
        msg = p.report("permission matrix")
        if msg:
            self.fail(msg)
        # watch, over gRPC with each role's token (etcdctl processes for every pair at once
        # are too slow to start on a busy machine): the first answer to a create is either
        # "created" or a cancel saying why.
        seen = set()
        for role, _ in self.RANGES:
            answers = []
            for s in (sut, etcd):
                answers.append([self.watch_answer(s, "u-%s" % role, rng)
                                for rng in ((b"key1", b""), (b"key1", b"key5"), (b"key", b"kez"),
                                            (b"other", b""))])
            # Not compared: a from-key watch. etcd 3.4 turns its "\0" end into "" before the
            # permission check, so it checks the start key alone (a role for [key1, key5)
            # may watch everything from key3 on); Keelson's watch.c checks the whole range.
            self.assertEqual(answers[0], answers[1], role)
            seen.update(answers[0])
        self.assertEqual(seen, {("created",), ("canceled", True)})

    def watch_answer(self, server, user, rng):
        import grpc
        from etcd3 import etcdrpc
        k = pki()
        creds = grpc.ssl_channel_credentials(open(k.p("ca.crt"), "rb").read(),
                                             open(k.p("root.key"), "rb").read(),
                                             open(k.p("root.crt"), "rb").read())
        done = threading.Event()

        def requests():
            yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(key=rng[0], range_end=rng[1]))
            done.wait(10)

        with grpc.secure_channel(server.endpoint, creds) as ch:
            tok = etcdrpc.AuthStub(ch).Authenticate(
                etcdrpc.AuthenticateRequest(name=user, password="pw"), timeout=10).token
            call = etcdrpc.WatchStub(ch).Watch(requests(), metadata=[("token", tok)], timeout=10)
            try:
                first = next(call)
            finally:
                done.set()
                call.cancel()
        if first.canceled:
            # etcd words the reason as the whole gRPC error (watch.c does not: reported)
            return ("canceled", "permission denied" in first.cancel_reason)
        return ("created",) if first.created else ("other", str(first))


class RefusedClients(unittest.TestCase):
    """--client-cert-auth: no certificate, a certificate from another CA, and (with
    --client-crl-file) a revoked certificate are refused by both servers."""

    def test_refused(self):
        sut, etcd = start_tls_pair(self, pki().server_flags(crl=True))
        k = pki()
        cases = [
            ("no certificate", k.client(None), False),
            ("wrong CA", ["--cacert=" + k.p("ca.crt"), "--cert=" + k.p("evilroot.crt"),
                          "--key=" + k.p("evilroot.key")], False),
            ("revoked", k.client("revoked"), False),
            ("good", k.client("alice"), True),
            ("plaintext", [], False),
        ]
        results = {}

        def go(name, flags, s):
            results[(name, s.label)] = harness.etcdctl(s.endpoint, *flags, "--dial-timeout=1s",
                                                       "--command-timeout=2s", "put", "k", "v")
        ts = [threading.Thread(target=go, args=(name, flags, s))
              for name, flags, _ in cases for s in (sut, etcd)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for name, flags, ok in cases:
            for s in (sut, etcd):
                r = results[(name, s.label)]
                self.assertEqual(r.rc == 0, ok, (name, s.label, r))
                if not ok:
                    self.assertIn("context deadline exceeded", r.stderr, (name, s.label))


class CertificateCN(unittest.TestCase):
    """With --client-cert-auth and auth on, a request without a token acts as the user its
    certificate names (etcd's AuthInfoFromTLS)."""

    def test_cn_is_user(self):
        sut, etcd = start_tls_pair(self, pki().server_flags())
        k = pki()
        p = Pair(sut, etcd)
        p.run("user", "add", "root:rootpw")
        p.run("user", "grant-role", "root", "root")
        p.run("user", "add", "alice:apw")
        p.run("role", "add", "a")
        p.run("role", "grant-permission", "a", "readwrite", "/a/", "--prefix=true")
        p.run("user", "grant-role", "alice", "a")
        p.run("auth", "enable")
        p.run("put", "/a/1", "root-by-cert")        # the root certificate, no token
        p.run("user", "list")
        self.check_as(p, "alice", [("put", "/a/2", "x"), ("get", "/a/", "--prefix"), ("put", "/b", "x"),
                                   ("user", "list")])
        self.check_as(p, "nobody", [("get", "/a/1"), ("put", "/a/3", "x"), ("user", "list")])
        self.check_as(p, "alice", [("--user", "root:rootpw", "user", "list")])  # token wins
        msg = p.report("cn")
        if msg:
            self.fail(msg)
        del k

    def test_trusted_ca_without_client_cert_auth(self):
        """--trusted-ca-file alone: etcd still refuses clients without a certificate, but a
        certificate's CN is not a user."""
        sut, etcd = start_tls_pair(self, pki().server_flags(client_cert_auth=False))
        p = Pair(sut, etcd)
        p.run("user", "add", "root:rootpw")
        p.run("user", "grant-role", "root", "root")
        p.run("auth", "enable")
        p.run("put", "a", "b")                          # the root certificate: no user
        p.run("--user=root:rootpw", "put", "a", "b")
        msg = p.report("trusted-ca")
        if msg:
            self.fail(msg)
        for s in (sut, etcd):
            r = harness.etcdctl(s.endpoint, *pki().client(None), "--dial-timeout=1s",
                                "--command-timeout=2s", "--user=root:rootpw", "get", "a")
            self.assertNotEqual(r.rc, 0, s.label)

    def check_as(self, p, cn, ops):
        saved = (p.sut.ctl_tls, p.oracle.ctl_tls)
        p.sut.ctl_tls = p.oracle.ctl_tls = pki().client(cn)
        try:
            for op in ops:
                p.run(*op, note="as certificate CN=%s" % cn)
        finally:
            p.sut.ctl_tls, p.oracle.ctl_tls = saved


def b64url_json(seg):
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


class JWTTokens(unittest.TestCase):
    """--auth-token jwt: etcd's start-up errors; the same commands work on both; a token
    minted by etcd with the same keys verifies on Keelson and has the same structure."""

    METHODS = {
        "RS256": ("rsa", ["genrsa", "2048"]), "PS384": ("rsa", ["genrsa", "2048"]),
        "ES256": ("ec", ["ecparam", "-name", "prime256v1", "-genkey", "-noout"]),
        "ES512": ("ec", ["ecparam", "-name", "secp521r1", "-genkey", "-noout"]),
        "HS256": ("hmac", None),
    }

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="keelson-it-jwt-")
        cls.keys = {}
        for m, (kind, gen) in cls.METHODS.items():
            priv = os.path.join(cls.dir, m + ".key")
            pub = os.path.join(cls.dir, m + ".pub")
            if kind == "hmac":
                with open(priv, "wb") as f:
                    f.write(os.urandom(32).hex().encode())
                pub = priv
            else:
                sh(OPENSSL, *gen[:-1], "-out", priv, *gen[-1:]) if gen[0] == "genrsa" else \
                    sh(OPENSSL, *gen, "-out", priv)
                sh(OPENSSL, "pkey", "-in", priv, "-pubout", "-out", pub)
            cls.keys[m] = (priv, pub)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def jwt_flag(self, m, ttl=None, pub=True):
        priv, pubf = self.keys[m]
        v = "jwt,%spriv-key=%s,sign-method=%s" % ("pub-key=%s," % pubf if pub else "", priv, m)
        return v + (",ttl=" + ttl if ttl else "")

    def token(self, server, user="root", pw="rootpw"):
        """Authenticate over gRPC (python3-etcd3's stubs) and return the token."""
        import grpc
        from etcd3 import etcdrpc
        with grpc.insecure_channel(server.endpoint) as ch:
            stub = etcdrpc.AuthStub(ch)
            return stub.Authenticate(etcdrpc.AuthenticateRequest(name=user, password=pw), timeout=5).token

    def get_with(self, server, token, key="foo"):
        import grpc
        from etcd3 import etcdrpc
        with grpc.insecure_channel(server.endpoint) as ch:
            stub = etcdrpc.KVStub(ch)
            try:
                r = stub.Range(etcdrpc.RangeRequest(key=key.encode()), timeout=5,
                               metadata=[("token", token)])
                return ("ok", [kv.value for kv in r.kvs])
            except grpc.RpcError as e:
                return (e.code().name, e.details())

    def test_methods_and_interop(self):
        for m in self.METHODS:
            with self.subTest(method=m):
                sut, etcd = harness.pair_for_test(self, extra_args=["--auth-token", self.jwt_flag(m)])
                p = Pair(sut, etcd)
                p.run("user", "add", "root:rootpw")
                p.run("user", "grant-role", "root", "root")
                p.run("user", "add", "al:apw")
                p.run("auth", "enable")
                p.run("--user", "root:rootpw", "put", "foo", "bar")
                p.run("--user", "root:rootpw", "get", "foo")
                p.run("--user", "al:apw", "get", "foo")
                p.run("--user", "root:rootpw", "user", "list")
                msg = p.report("jwt " + m)
                if msg:
                    self.fail(msg)
                tk, te = self.token(sut), self.token(etcd)
                # same structure: header and claims
                hk, ck = (b64url_json(s) for s in tk.split(".")[:2])
                he, ce = (b64url_json(s) for s in te.split(".")[:2])
                self.assertEqual(hk, he)
                self.assertEqual(sorted(ck), sorted(ce))
                self.assertEqual((ck["username"], ck["revision"]), (ce["username"], ce["revision"]))
                self.assertLessEqual(abs(ck["exp"] - ce["exp"]), 5)
                self.assertEqual(tk.split(".")[0], te.split(".")[0])
                # each verifies the other's token (same keys); junk and tampering are refused
                self.assertEqual(self.get_with(sut, te), ("ok", [b"bar"]))
                self.assertEqual(self.get_with(etcd, tk), ("ok", [b"bar"]))
                h, c, sig = tk.split(".")
                forged = base64.urlsafe_b64encode(json.dumps(
                    dict(ck, username="al")).encode()).decode().rstrip("=")
                for bad in (h + "." + forged + "." + sig, "x.y.z", tk + "x"):
                    self.assertEqual(self.get_with(sut, bad), self.get_with(etcd, bad))
                    self.assertEqual(self.get_with(sut, bad)[0], "UNAUTHENTICATED")
                # an auth change makes older tokens stale: etcd's "revision of auth store is old"
                p.run("--user", "root:rootpw", "role", "add", "r2")
                self.assertEqual(self.get_with(sut, tk), self.get_with(etcd, te))
                self.assertEqual(self.get_with(sut, tk),
                                 ("INVALID_ARGUMENT", "etcdserver: revision of auth store is old"))

    def test_every_member_verifies(self):
        """A token one member signs is good on every member: JWTs are not in the log."""
        import cluster
        c = cluster.Cluster(3, extra_args=["--auth-token", self.jwt_flag("ES256")], label="jwt")
        self.addCleanup(c.cleanup)
        c.start()
        m1, m2, m3 = c.members
        for args in (("user", "add", "root:rootpw"), ("user", "grant-role", "root", "root"),
                     ("auth", "enable")):
            self.assertEqual(m1.ctl(*args).rc, 0, args)
        self.assertEqual(m1.ctl("--user=root:rootpw", "put", "foo", "bar").rc, 0)
        tok = self.token(m2)
        for m in (m1, m2, m3):
            self.assertEqual(self.get_with(m, tok), ("ok", [b"bar"]), m.name)

    def test_expiry(self):
        sut = harness.fresh_server(self, extra_args=["--auth-token", self.jwt_flag("ES256", ttl="2s")])
        sut.ctl("user", "add", "root:rootpw")
        sut.ctl("user", "grant-role", "root", "root")
        self.assertEqual(sut.ctl("auth", "enable").rc, 0)
        tok = self.token(sut)
        self.assertEqual(self.get_with(sut, tok)[0], "ok")
        exp = b64url_json(tok.split(".")[1])["exp"]
        # jwt-go: valid while now <= exp, in whole seconds
        while time.time() < exp + 1.05:
            time.sleep(0.2)
        self.assertEqual(self.get_with(sut, tok), ("UNAUTHENTICATED", "etcdserver: invalid auth token"))

    def test_startup_errors(self):
        bad = [
            ["--auth-token", "jwt"],
            ["--auth-token", "bogus"],
            ["--auth-token", "jwt,sign-method=RS256,priv-key=/nonexistent/k"],
            ["--auth-token", "jwt,sign-method=XX1,priv-key=" + self.keys["RS256"][0]],
            ["--auth-token", "jwt,sign-method=RS256,priv-key=" + self.keys["RS256"][0] + ",x"],
            ["--auth-token", "jwt,sign-method=RS256,pub-key=" + self.keys["ES256"][1] + ",priv-key=" +
             self.keys["ES256"][0]],
            ["--auth-token", "jwt,sign-method=HS256"],
            ["--cipher-suites", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,BOGUS"],
        ]
        for args in bad:
            lines = []
            for binary in (harness.KEELSON_BIN, harness.ETCD_BIN):
                s = harness.Server(binary, extra_args=args, label="bad")
                self.addCleanup(s.cleanup)
                proc = subprocess.run([binary] + s.args(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=30, cwd=s.tmp,
                                      env=harness.clean_env())
                out = proc.stdout.decode(errors="replace")
                fatal = [ln for ln in out.splitlines() if " C | " in ln or "FATAL" in ln or
                         '"level":"fatal"' in ln]
                self.assertNotEqual(proc.returncode, 0, (binary, args, out[-2000:]))
                self.assertTrue(fatal, (binary, args, out[-2000:]))
                lines.append(re.sub(r".*(C \| etcdmain|keelson): ", "", fatal[-1]).strip())
            self.assertEqual(lines[0], lines[1], args)

    def test_verify_only(self):
        """With only a public key, tokens verify but none can be signed (etcd's verify-only)."""
        priv, pub = self.keys["RS256"]
        flag = "jwt,pub-key=%s,sign-method=RS256" % pub
        sut, etcd = harness.pair_for_test(self, extra_args=["--auth-token", flag])
        p = Pair(sut, etcd)
        p.run("user", "add", "root:rootpw")
        p.run("user", "grant-role", "root", "root")
        p.run("auth", "enable")
        p.run("--user", "root:rootpw", "get", "foo")
        msg = p.report("verify-only")
        if msg:
            self.fail(msg)


class AutoTLSAndCiphers(unittest.TestCase):

    def test_auto_tls(self):
        """--auto-tls: a self-signed pair under <data-dir>/fixtures/client, https served."""
        for binary in (harness.KEELSON_BIN, harness.ETCD_BIN):
            s = TLSServer(binary, tls_client=None, label="auto", extra_args=["--auto-tls"])
            s.ctl_tls = ["--insecure-transport=false", "--insecure-skip-tls-verify"]
            checked_cleanup(self, s)
            s.start()
            fx = os.path.join(s.data_dir, "fixtures", "client")
            self.assertEqual(sorted(os.listdir(fx)), ["cert.pem", "key.pem"])
            self.assertEqual(os.stat(os.path.join(fx, "key.pem")).st_mode & 0o777, 0o600)
            text = sh(OPENSSL, "x509", "-in", os.path.join(fx, "cert.pem"), "-noout", "-text").decode()
            self.assertIn("O = etcd", text)
            self.assertIn("IP Address:127.0.0.1", text)
            self.assertIn("TLS Web Server Authentication", text)
            self.assertRegex(text, "NIST CURVE: P-521|ASN1 OID: secp521r1")
            r = s.ctl("put", "a", "b")
            self.assertEqual(r.rc, 0, r)
            r = harness.etcdctl(s.endpoint, "--dial-timeout=1s", "--command-timeout=2s", "get", "a")
            self.assertNotEqual(r.rc, 0)  # plaintext refused
            cert = open(os.path.join(fx, "cert.pem")).read()
            s.restart()   # the pair is kept
            self.assertEqual(open(os.path.join(fx, "cert.pem")).read(), cert)

    def handshake(self, port, cipher):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
        ctx.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with ctx.wrap_socket(raw) as t:
                    return t.cipher()[0]
        except (ssl.SSLError, ConnectionError):
            return None

    def test_cipher_suites(self):
        """--cipher-suites: TLS 1.2 handshakes offering only other suites are refused."""
        # Go's HTTP/2 needs an ECDHE AES_128_GCM_SHA256 suite; etcd 3.4 (capnslog) crashes on
        # the listener error without --logger=zap, so both run with zap here.
        server_only = ["--cert-file", pki().p("server.crt"), "--key-file", pki().p("server.key")]
        flags = server_only + ["--logger=zap", "--cipher-suites",
                                                              "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_AES_128_GCM_SHA256"]
        sut, etcd = start_tls_pair(self, flags, ctl_tls=["--cacert=" + pki().p("ca.crt")])
        for s in (sut, etcd):
            self.assertEqual(self.handshake(s.client_port, "ECDHE-ECDSA-AES128-GCM-SHA256"),
                             "ECDHE-ECDSA-AES128-GCM-SHA256", s.label)
            self.assertIsNone(self.handshake(s.client_port, "ECDHE-ECDSA-AES256-GCM-SHA384"), s.label)
            self.assertIsNone(self.handshake(s.client_port, "ECDHE-ECDSA-CHACHA20-POLY1305"), s.label)
            self.assertEqual(s.ctl("put", "a", "b").rc, 0)
        # without the HTTP/2 suite: etcd's listener error, at start-up
        for binary in (harness.KEELSON_BIN, harness.ETCD_BIN):
            s = TLSServer(binary, None, "nohttp2", server_only + [
                "--logger=zap", "--cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"])
            self.addCleanup(s.cleanup)
            p = subprocess.run([binary] + s.args(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=30, cwd=s.tmp, env=harness.clean_env())
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(b"missing an HTTP/2-required AES_128_GCM_SHA256 cipher", p.stdout, binary)


class ConfigFile(unittest.TestCase):
    """--config-file in etcd's YAML: the file wins over flags and environment; etcd's errors."""

    def yaml_for(self, s, extra=""):
        return ("name: cfgmember\n"
                "data-dir: %s\n"
                "listen-client-urls: %s\n"
                "advertise-client-urls: %s\n"
                "listen-peer-urls: %s\n"
                "initial-advertise-peer-urls: %s\n"
                "initial-cluster: cfgmember=%s\n"
                "initial-cluster-token: 'tok-1'\n"
                "cert-file: /nonexistent/only-in-the-section\n"
                "unknown-key: [1, 2]\n"
                "auth-token: simple\n" % (s.data_dir, s.client_url, s.client_url, s.peer_url,
                                          s.peer_url, s.peer_url)) + extra

    def test_config_file_tls(self):
        k = pki()
        outs = []
        for binary in (harness.KEELSON_BIN, harness.ETCD_BIN):
            s = TLSServer(binary, tls_client=("alice",), label="cfg")
            checked_cleanup(self, s)
            path = os.path.join(s.tmp, "etcd.yml")
            with open(path, "w") as f:
                f.write(self.yaml_for(s, "client-transport-security:\n"
                                         "  cert-file: %s\n  key-file: %s\n"
                                         "  client-cert-auth: true\n  trusted-ca-file: %s\n"
                                         "  auto-tls: false\n"
                                         "peer-transport-security:\n  client-cert-auth: false\n"
                                         % (k.p("server.crt"), k.p("server.key"), k.p("ca.crt"))))
            # flags after --config-file are ignored, as etcd ignores them
            s.extra_args = ["--config-file", path, "--name", "ignored", "--auth-token", "bogus"]
            s.start()
            r = s.ctl("-w", "json", "member", "list")
            self.assertEqual(r.rc, 0, r)
            outs.append([m["name"] for m in json.loads(r.stdout)["members"]])
            self.assertTrue(os.path.isdir(os.path.join(s.data_dir, "member")))
            self.assertNotEqual(harness.etcdctl(s.endpoint, *k.client(None), "--dial-timeout=1s",
                                                "--command-timeout=2s", "get", "x").rc, 0)
        self.assertEqual(outs[0], ["cfgmember"])
        self.assertEqual(outs[0], outs[1])

    def test_errors(self):
        tmp = tempfile.mkdtemp(prefix="keelson-it-cfg-")
        self.addCleanup(shutil.rmtree, tmp, True)
        cases = {
            "missing": None,
            "not-yaml": "name: [unclosed\n",
            "unterminated": 'name: "x\n',
            "tab": "name:\n\t- b\n",
            "bad-type": "name: x\nsnapshot-count: lots\n",
            "number-name": "name: 12\n",
            "bad-duration": "grpc-keepalive-interval: 5s\n",
            "bad-bool": "client-transport-security:\n  client-cert-auth: maybe\n",
            "bad-url": "listen-client-urls: nonsense\n",
            "no-port": "listen-client-urls: http://127.0.0.1\n",
        }
        for name, text in cases.items():
            path = os.path.join(tmp, name + ".yml")
            if text is not None:
                with open(path, "w") as f:
                    f.write(text)
            res = []
            for binary in (harness.KEELSON_BIN, harness.ETCD_BIN):
                # the missing file through ETCD_CONFIG_FILE, the others through the flag
                argv, env = [binary, "--config-file", path], harness.clean_env()
                if name == "missing":
                    argv, env = [binary], harness.clean_env({"ETCD_CONFIG_FILE": path})
                p = subprocess.run(argv, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=30, cwd=tmp, env=env)
                out = p.stdout.decode(errors="replace")
                self.assertNotEqual(p.returncode, 0, (binary, name, out))
                res.append(out)
            why = [re.search(r"error verifying flags, .*(?=\. See ')|unexpected error setting up .*", out)
                   for out in res]
            self.assertTrue(all(why), (name, res))
            self.assertEqual(why[0].group(0), why[1].group(0), name)
            if name == "missing":
                self.assertIn("open %s: no such file or directory" % path, res[0])


def tearDownModule():
    global _pki
    if _pki is not None:
        _pki.cleanup()
        _pki = None


if __name__ == "__main__":
    unittest.main()
