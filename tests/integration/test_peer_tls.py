"""Peer TLS (issue 7): 3-member clusters with https peer URLs, certificates made here with the
`openssl` command (a CA, one certificate per member, and an outsider CA), and with
--peer-auto-tls. Writes through every member, kill the leader, a new leader keeps the data;
a member whose certificate comes from another CA, or that speaks plaintext, cannot join.

  /usr/bin/python3 tests/integration/run.py test_peer_tls
  KEELSON_BIN=/usr/bin/etcd /usr/bin/python3 tests/integration/run.py test_peer_tls  # the oracle

Where behaviour is etcd's own (start-up refusals, the same certificates forming a cluster),
the test also runs /usr/bin/etcd when present.
"""

import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import unittest

import harness
from harness import etcdctl
import cluster as clusterlib
from cluster import Cluster, ClusterError

ETCD = "/usr/bin/etcd"
IS_ETCD = os.path.basename(harness.KEELSON_BIN).startswith("etcd")
ELECTION_S = clusterlib.ELECTION_MS / 1000.0


def poll(fn, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s (last %r)"
                                 % (timeout, what, last))
        time.sleep(interval)


def openssl(*args, cwd):
    p = subprocess.run(["openssl"] + list(args), cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("openssl %s: %s" % (" ".join(args), p.stderr.decode()))


class Certs:
    """CA "ca" signs m1..m4; CA "other" signs "outsider". Files <name>.pem, <name>-key.pem."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="keelson-it-peer-tls-")
        for ca in ("ca", "other"):
            openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", ca + "-key.pem", "-out", ca + ".pem", "-days", "2",
                    "-subj", "/CN=keelson test %s" % ca, cwd=self.dir)
        with open(os.path.join(self.dir, "ext.cnf"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
        for name, ca in (("m1", "ca"), ("m2", "ca"), ("m3", "ca"), ("m4", "ca"),
                         ("outsider", "other")):
            openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", name + "-key.pem", "-out", name + ".csr",
                    "-subj", "/CN=" + name, cwd=self.dir)
            openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey",
                    ca + "-key.pem", "-CAcreateserial", "-out", name + ".pem", "-days", "2",
                    "-extfile", "ext.cnf", cwd=self.dir)

    def path(self, name):
        return os.path.join(self.dir, name)

    def flags(self, name, ca="ca", client_cert_auth=True):
        f = ["--peer-cert-file", self.path(name + ".pem"),
             "--peer-key-file", self.path(name + "-key.pem"),
             "--peer-trusted-ca-file", self.path(ca + ".pem")]
        if client_cert_auth:
            f.append("--peer-client-cert-auth")
        return f

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


CERTS = None


def setUpModule():
    global CERTS
    CERTS = Certs()


def tearDownModule():
    if CERTS is not None:
        CERTS.cleanup()


def mutual_tls(m):
    name = m.name if m.name in ("m1", "m2", "m3", "m4") else "outsider"
    return CERTS.flags(name, client_cert_auth=True)


class PeerTLSBase(unittest.TestCase):
    def watch_sanitizers(self, c):
        """With KEELSON_SANITIZER_CHECK=1 (an ASan build), any report in a member's log fails
        the test. Register after c.cleanup: cleanups run last-in first-out."""
        def check():
            if os.environ.get("KEELSON_SANITIZER_CHECK") != "1":
                return
            for m in c.members:
                report = m.sanitizer_report()
                if report:
                    self.fail(report)
        self.addCleanup(check)

    def ctl_ok(self, m, *args, **kw):
        r = m.ctl(*args, **kw)
        self.assertEqual(r.rc, 0, r)
        return r

    def get(self, m, key, serializable=False):
        args = ["get", key, "--print-value-only"]
        if serializable:
            args.append("--consistency=s")
        r = m.ctl(*args, timeout=10)
        return r.stdout.strip() if r.rc == 0 else None

    def write_kill_leader_check(self, c):
        """Writes through every member, kills the leader, checks a new one and the data."""
        for i, m in enumerate(c.members):
            self.ctl_ok(m, "put", "/tls/%d" % i, "v%d" % i)
        ldr = c.leader()
        ldr.kill9()
        new = c.wait_leader(timeout=10 * ELECTION_S + 5, exclude=(ldr,))
        self.assertIsNot(new, ldr)
        self.ctl_ok(new, "put", "/tls/after", "kill")
        for m in c.live():
            for i in range(len(c.members)):
                self.assertEqual(self.get(m, "/tls/%d" % i), "v%d" % i, m)
            self.assertEqual(self.get(m, "/tls/after"), "kill", m)
        # The killed leader comes back over TLS and catches up.
        c.restart(ldr)
        poll(lambda: self.get(ldr, "/tls/after", serializable=True) == "kill", 15,
             what="restarted member catches up")
        return ldr


class TestPeerTLSCluster(PeerTLSBase):
    def setUp(self):
        self.cluster = Cluster(3, label="ptls", peer_tls=mutual_tls).start()
        self.addCleanup(self.cluster.cleanup)
        self.watch_sanitizers(self.cluster)

    def test_write_kill_leader(self):
        c = self.cluster
        self.write_kill_leader_check(c)
        if not IS_ETCD:
            for m in c.members:
                with open(m.log_path, "rb") as f:
                    self.assertIn(b"starting with peer TLS", f.read(), m.log_path)

    def test_peer_port_speaks_tls(self):
        """The peer port is TLS and requires a client certificate from the CA."""
        m = self.cluster.members[0]
        ctx = ssl.create_default_context(cafile=CERTS.path("ca.pem"))
        ctx.load_cert_chain(CERTS.path("m4.pem"), CERTS.path("m4-key.pem"))
        with socket.create_connection(("127.0.0.1", m.peer_port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                self.assertIn(t.version(), ("TLSv1.2", "TLSv1.3"))
                cert = t.getpeercert()
                self.assertIn(("commonName", "m1"), [x[0] for x in cert["subject"]])
        # Without a client certificate the handshake fails (TLS 1.3 reports it on read).
        ctx2 = ssl.create_default_context(cafile=CERTS.path("ca.pem"))
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection(("127.0.0.1", m.peer_port), timeout=5) as s:
                with ctx2.wrap_socket(s, server_hostname="127.0.0.1") as t:
                    t.sendall(b"\0\0\0\1x")
                    if t.recv(1) == b"":
                        raise ConnectionError("closed")

    def add_learner(self, m4, url):
        c = self.cluster
        f = c.followers()[0]

        def add():
            r = etcdctl(f.endpoint, "member", "add", m4.name, "--learner",
                        "--peer-urls=" + url)
            if r.rc != 0:
                self.assertIn("etcdserver: unhealthy cluster", r.stderr, r)
                return None
            return r
        poll(add, 15, interval=0.5, what="member add")

    def logs_contain(self, members, needle):
        for m in members:
            with open(m.log_path, "rb") as f:
                if needle in f.read():
                    return True
        return False

    def test_member_joins_over_tls(self):
        """A member added (as a learner) with an https peer URL asks the members for its id
        over TLS (GET /members) and catches up."""
        c = self.cluster
        self.ctl_ok(c.members[0], "put", "/tls/before", "join")
        m4 = c.add_member_object("m4")
        self.add_learner(m4, m4.peer_url)
        m4.spawn()
        poll(lambda: self.get(m4, "/tls/before", serializable=True) == "join", 20,
             what="the new member has the data")
        self.assertTrue(m4.alive(), m4.log_tail())

    def test_member_from_another_ca_cannot_join(self):
        c = self.cluster
        self.ctl_ok(c.members[0], "put", "/tls/before", "join")
        m4 = c.add_member_object("outsider")  # mutual_tls gives it the other CA's cert
        self.add_learner(m4, m4.peer_url)
        m4.spawn()
        # Both directions fail the handshake, so it never gets the data. (It trusts our CA,
        # so it is the others who refuse it: its certificate is from another CA.)
        needle = b"certificate verify failed" if not IS_ETCD else b"certificate"
        poll(lambda: self.logs_contain(c.members[:3], needle), 15,
             what="members log the refused certificate")
        # Both fetch the member list over TLS at start-up (GET <peer-url>/members, for the
        # id `member add` made) and exit when they cannot.
        poll(lambda: not m4.alive(), 15, what="the outsider gives up")
        if not IS_ETCD:
            self.assertTrue(self.logs_contain([m4], b"could not retrieve cluster information"),
                            m4.log_tail())
            self.assertTrue(self.logs_contain([m4], b"tls: "), m4.log_tail())
        # The cluster is unharmed.
        self.ctl_ok(c.wait_leader(members=c.members[:3]), "put", "/tls/still", "ok")

    @unittest.skipIf(IS_ETCD, "etcd's plaintext member dials https URLs with Go's default TLS "
                              "and logs an x509 error instead")
    def test_plaintext_member_cannot_join_with_a_reason(self):
        """A member without TLS flags (http peer URLs) joining a TLS cluster: it cannot ask
        the members (https peer URLs) for its id, so it does not start, and says why. (The
        TLS mismatch of a plaintext HELLO on a TLS listener: peer_test's tls_mismatch.)"""
        c = self.cluster
        m4 = c.add_member_object("m4")
        url = "http://127.0.0.1:%d" % m4.peer_port
        self.add_learner(m4, url)
        m4.initial_cluster = c.initial_cluster(c.members[:3]) + ",m4=" + url
        # Started without TLS flags: with cluster.peer_tls unset, its URLs are http.
        real_tls = c.peer_tls
        c.peer_tls = None
        try:
            m4.spawn()
        finally:
            c.peer_tls = real_tls
        poll(lambda: not m4.alive(), 15, what="the plaintext member gives up")
        self.assertTrue(self.logs_contain([m4], b"an https peer URL without peer TLS"),
                        m4.log_tail())
        self.assertTrue(self.logs_contain([m4], b"could not retrieve cluster information"),
                        m4.log_tail())
        self.ctl_ok(c.wait_leader(members=c.members[:3]), "put", "/tls/still", "ok")


class TestPeerAutoTLS(PeerTLSBase):
    def test_auto_tls_cluster(self):
        c = Cluster(3, label="pauto", peer_tls=lambda m: ["--peer-auto-tls"]).start()
        self.addCleanup(c.cleanup)
        self.watch_sanitizers(c)
        for m in c.members:
            for f in ("cert.pem", "key.pem"):
                self.assertTrue(os.path.isfile(os.path.join(m.data_dir, "fixtures", "peer", f)))
        before = open(os.path.join(c.members[0].data_dir, "fixtures", "peer", "cert.pem")).read()
        restarted = self.write_kill_leader_check(c)
        # A restart keeps the certificate it made.
        after = open(os.path.join(restarted.data_dir, "fixtures", "peer", "cert.pem")).read()
        if restarted is c.members[0]:
            self.assertEqual(before, after)
        out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName",
                              "-in", os.path.join(c.members[0].data_dir, "fixtures", "peer",
                                                  "cert.pem")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode()
        self.assertIn("O = etcd", out)
        self.assertIn("IP Address:127.0.0.1", out)


class TestPeerTLSStartup(unittest.TestCase):
    """Configurations etcd refuses at start-up, with etcd's message."""

    def run_member(self, binary, extra):
        tmp = tempfile.mkdtemp(prefix="keelson-it-ptls-start-")
        self.addCleanup(shutil.rmtree, tmp, True)
        cport, pport = harness.free_port(), harness.free_port()
        purl = "https://127.0.0.1:%d" % pport
        argv = [binary, "--name", "s", "--data-dir", os.path.join(tmp, "d"),
                "--listen-client-urls", "http://127.0.0.1:%d" % cport,
                "--advertise-client-urls", "http://127.0.0.1:%d" % cport,
                "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
                "--initial-cluster", "s=" + purl] + extra
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
                           env=harness.clean_env())
        return p.returncode, p.stdout.decode("utf-8", "replace")

    def test_https_without_cert(self):
        binaries = [harness.KEELSON_BIN] + ([ETCD] if os.path.exists(ETCD) and not IS_ETCD else [])
        for b in binaries:
            rc, out = self.run_member(b, [])
            self.assertNotEqual(rc, 0, (b, out))
            self.assertRegex(out, r"cannot listen on TLS for 127\.0\.0\.1:\d+: KeyFile and "
                                  r"CertFile are not presented", (b, out))

    @unittest.skipIf(IS_ETCD, "Keelson's own message")
    def test_unreadable_cert(self):
        rc, out = self.run_member(harness.KEELSON_BIN,
                                  ["--peer-cert-file", "/nonexistent/cert.pem",
                                   "--peer-key-file", "/nonexistent/key.pem"])
        self.assertNotEqual(rc, 0, out)
        self.assertIn("/nonexistent/cert.pem", out)


class TestPeerClientSAN(PeerTLSBase):
    """etcd's checkSAN: an https peer listener refuses a dialing member whose certificate
    names IPs none of which is the address the connection comes from. Member a listens on
    127.0.0.2 with a certificate for 127.0.0.2 only; it dials b from 127.0.0.1, so b refuses
    it with Go's x509 error (a's listener accepts b, whose certificate names 127.0.0.1).
    etcd 3.5's --experimental-peer-skip-client-san-verification lets a in."""

    def make_cert(self):
        path = CERTS.path("san2.pem")
        if not os.path.exists(path):
            with open(CERTS.path("san2.cnf"), "w") as f:
                f.write("subjectAltName=IP:127.0.0.2\nextendedKeyUsage=serverAuth,clientAuth\n")
            openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "san2-key.pem", "-out", "san2.csr", "-subj", "/CN=san2", cwd=CERTS.dir)
            openssl("x509", "-req", "-in", "san2.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                    "-CAcreateserial", "-out", "san2.pem", "-days", "2", "-extfile", "san2.cnf",
                    cwd=CERTS.dir)

    def start_pair(self, binary, extra=()):
        """Members a (127.0.0.2, certificate san2) and b (127.0.0.1, certificate m1)."""
        self.make_cert()
        tmp = tempfile.mkdtemp(prefix="keelson-it-ptls-san-")
        self.addCleanup(shutil.rmtree, tmp, True)
        ports = {n: (harness.free_port(), harness.free_port()) for n in "ab"}
        host = {"a": "127.0.0.2", "b": "127.0.0.1"}
        cert = {"a": "san2", "b": "m1"}
        purl = {n: "https://%s:%d" % (host[n], ports[n][1]) for n in "ab"}
        cluster = ",".join("%s=%s" % (n, purl[n]) for n in "ab")
        procs = {}
        for n in "ab":
            curl = "http://127.0.0.1:%d" % ports[n][0]
            log = open(os.path.join(tmp, n + ".log"), "wb")
            self.addCleanup(log.close)
            argv = [binary, "--name", n, "--data-dir", os.path.join(tmp, n),
                    "--listen-client-urls", curl, "--advertise-client-urls", curl,
                    "--listen-peer-urls", purl[n], "--initial-advertise-peer-urls", purl[n],
                    "--initial-cluster", cluster] + CERTS.flags(cert[n]) + list(extra)
            procs[n] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        env=harness.clean_env(), start_new_session=True)

            def stop(p=procs[n]):
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.addCleanup(stop)
        return tmp, {n: "127.0.0.1:%d" % ports[n][0] for n in "ab"}

    def log_of(self, tmp, n):
        with open(os.path.join(tmp, n + ".log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def test_refused_then_skipped(self):
        binaries = [harness.KEELSON_BIN] + ([ETCD] if os.path.exists(ETCD) and not IS_ETCD else [])
        for b in binaries:
            tmp, _ = self.start_pair(b)
            poll(lambda: "x509: certificate is valid for 127.0.0.2, not 127.0.0.1" in self.log_of(tmp, "b"),
                 20, what="%s: b refusing a's certificate" % b)
        if IS_ETCD:
            return
        tmp, ends = self.start_pair(harness.KEELSON_BIN, ["--experimental-peer-skip-client-san-verification"])
        poll(lambda: etcdctl(ends["a"], "--command-timeout=2s", "put", "san", "skipped").rc == 0, 30,
             what="a cluster once the SAN check is skipped")
        self.assertEqual(self.get_at(ends["b"], "san"), "skipped")
        self.assertNotIn("x509: certificate is valid for", self.log_of(tmp, "b"))

    def get_at(self, endpoint, key):
        r = etcdctl(endpoint, "get", key, "--print-value-only")
        self.assertEqual(r.rc, 0, r.stderr)
        return r.stdout.strip()


class TestMixedPeerURLs(PeerTLSBase):
    """http and https peer URLs together, as etcd 3.4 allows: every member listens on one
    plaintext and one TLS port; a advertises its https URL first, b its http URL first, c
    only its http URL. Each member is dialed in the scheme of its first peer URL, each
    listener serves its own scheme (a wrong scheme is refused: see the plaintext member
    test), so the cluster forms only if both work. The same flags on etcd."""

    def start_mixed(self, binary):
        tmp = tempfile.mkdtemp(prefix="keelson-it-ptls-mixed-")
        self.addCleanup(shutil.rmtree, tmp, True)
        names = {"a": "m1", "b": "m2", "c": "m3"}
        ports = {n: [harness.free_port() for _ in range(3)] for n in names}  # client, http, https
        http = {n: "http://127.0.0.1:%d" % ports[n][1] for n in names}
        https = {n: "https://127.0.0.1:%d" % ports[n][2] for n in names}
        adv = {"a": [https["a"], http["a"]], "b": [http["b"], https["b"]], "c": [http["c"]]}
        cluster = ",".join("%s=%s" % (n, u) for n in names for u in adv[n])
        ends = {}
        for n, cert in names.items():
            curl = "http://127.0.0.1:%d" % ports[n][0]
            ends[n] = "127.0.0.1:%d" % ports[n][0]
            log = open(os.path.join(tmp, n + ".log"), "wb")
            self.addCleanup(log.close)
            argv = [binary, "--name", n, "--data-dir", os.path.join(tmp, n),
                    "--listen-client-urls", curl, "--advertise-client-urls", curl,
                    "--listen-peer-urls", http[n] + "," + https[n],
                    "--initial-advertise-peer-urls", ",".join(adv[n]),
                    "--initial-cluster", cluster] + CERTS.flags(cert)
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env=harness.clean_env(), start_new_session=True)

            def stop(p=proc):
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.addCleanup(stop)
        return ends

    def test_mixed_cluster(self):
        binaries = [harness.KEELSON_BIN] + ([ETCD] if os.path.exists(ETCD) and not IS_ETCD else [])
        for b in binaries:
            ends = self.start_mixed(b)
            for i, n in enumerate("abc"):
                poll(lambda: etcdctl(ends[n], "--command-timeout=2s", "put", "mixed%d" % i, n).rc == 0,
                     30, what="%s: a write through %s" % (b, n))
            for n in "abc":
                r = etcdctl(ends[n], "get", "--prefix", "mixed", "--print-value-only")
                self.assertEqual((r.rc, r.stdout.split()), (0, ["a", "b", "c"]), (b, n, r.stderr))


@unittest.skipUnless(os.path.exists(ETCD) and not IS_ETCD, "needs /usr/bin/etcd")
class TestSameCertsWithEtcd(PeerTLSBase):
    """The oracle: the same certificates and flags form a real etcd 3.4 cluster."""

    def test_etcd_cluster_with_the_same_certs(self):
        c = Cluster(3, binary=ETCD, label="ptls-etcd", peer_tls=mutual_tls).start()
        self.addCleanup(c.cleanup)
        for i, m in enumerate(c.members):
            self.ctl_ok(m, "put", "/tls/%d" % i, "v%d" % i)
        for m in c.members:
            self.assertEqual(self.get(m, "/tls/2"), "v2")


if __name__ == "__main__":
    unittest.main()
