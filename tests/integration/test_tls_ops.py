"""Client TLS operations as etcd 3.5 runs them: --tls-min-version/--tls-max-version (with
etcd's start-up errors), certificate files replaced while the member runs, http and https
client URLs on one port (checked against etcd 3.4, which serves both through cmux), and
Maintenance.Downgrade's answers over raw gRPC (etcd 3.4 lacks the RPC; etcd 3.5's
v3_server.go and rpctypes give the expected answers).

Certificates come from test_tls_auth's PKI (made with the openssl command)."""

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import unittest

import grpc

import harness
from test_tls_auth import OPENSSL, TLSServer, checked_cleanup, pki


def handshake(port, *version_flags):
    """Whether `openssl s_client` completes a handshake (with the given version flags) and
    verifies the server against the test CA."""
    p = subprocess.run([OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile",
                        pki().p("ca.crt"), "-cert", pki().p("root.crt"), "-key", pki().p("root.key"),
                        "-verify_return_error", *version_flags],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=20)
    return p.returncode == 0


def served_cn(port):
    """The CN of the certificate a new TLS connection to port is given."""
    ctx = ssl.create_default_context(cafile=pki().p("ca.crt"))
    ctx.load_cert_chain(pki().p("root.crt"), pki().p("root.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            subject = dict(x[0] for x in s.getpeercert()["subject"])
            return subject["commonName"]


class PeerTLSServer(TLSServer):
    """A TLSServer whose peer URL is https too (the server certificate as peer certificate)."""

    @property
    def peer_url(self):
        return "https://127.0.0.1:%d" % self.peer_port

    def args(self):
        return super().args() + ["--peer-cert-file", pki().p("server.crt"),
                                 "--peer-key-file", pki().p("server.key")]


def start_keelson(testcase, extra_args, scheme="https"):
    s = PeerTLSServer(harness.KEELSON_BIN, ("root",), "sut", extra_args, scheme=scheme)
    checked_cleanup(testcase, s)
    s.start()
    return s


def failed_start(args):
    """Runs Keelson with args, expecting it to refuse to start; its output."""
    d = tempfile.mkdtemp(prefix="keelson-it-tlsops-")
    try:
        p = subprocess.run([harness.KEELSON_BIN, "--data-dir", d + "/data",
                            "--listen-client-urls", "http://127.0.0.1:%d" % harness.free_port(),
                            "--advertise-client-urls", "http://127.0.0.1:1",
                            "--listen-peer-urls", "http://127.0.0.1:%d" % harness.free_port(),
                            *args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        return p.returncode, p.stdout.decode(errors="replace")
    finally:
        shutil.rmtree(d, ignore_errors=True)


class TLSVersions(unittest.TestCase):
    def test_min_and_max(self):
        """A TLS 1.2 client is refused with --tls-min-version TLS1.3; a TLS 1.3 one with
        --tls-max-version TLS1.2; both get in by default. On the client port and, as etcd
        3.5 applies the bounds to peers too, on the (https) peer port."""
        base = pki().server_flags()
        s = start_keelson(self, base)
        for port in (s.client_port, s.peer_port):
            self.assertTrue(handshake(port, "-tls1_2"))
            self.assertTrue(handshake(port, "-tls1_3"))
        s.cleanup()
        s = start_keelson(self, base + ["--tls-min-version", "TLS1.3"])
        for port in (s.client_port, s.peer_port):
            self.assertFalse(handshake(port, "-tls1_2"))
            self.assertTrue(handshake(port, "-tls1_3"))
        self.assertEqual(s.ctl("put", "k", "v").rc, 0)
        s.cleanup()
        s = start_keelson(self, base + ["--tls-max-version", "TLS1.2"])
        for port in (s.client_port, s.peer_port):
            self.assertTrue(handshake(port, "-tls1_2"))
            self.assertFalse(handshake(port, "-tls1_3"))
        self.assertEqual(s.ctl("put", "k", "v").rc, 0)

    def test_startup_errors(self):
        """etcd 3.5's Config.Validate errors, under "failed to verify flags"."""
        cases = [
            (["--tls-min-version", "TLS1.1"], 'unexpected TLS version "TLS1.1" (must be one of: TLS1.2, TLS1.3)'),
            (["--tls-max-version", "tls1.3"], 'unexpected TLS version "tls1.3" (must be one of: TLS1.2, TLS1.3)'),
            (["--tls-min-version", "TLS1.3", "--tls-max-version", "TLS1.2"],
             "min version (TLS1.3) is greater than max version (TLS1.2)"),
            (["--tls-min-version", "TLS1.3", "--cipher-suites", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
             "cipher suites cannot be configured when only TLS1.3 is enabled"),
        ]
        for args, want in cases:
            rc, out = failed_start(args)
            self.assertNotEqual(rc, 0, args)
            self.assertIn("failed to verify flags", out, args)
            self.assertIn(want, out, args)
        # TLS 1.3 as both bounds, or a max alone, is fine: the member starts.
        s = start_keelson(self, pki().server_flags() + ["--tls-min-version", "TLS1.3",
                                                        "--tls-max-version", "TLS1.3"])
        self.assertEqual(s.ctl("put", "a", "b").rc, 0)


class CertificateReload(unittest.TestCase):
    def test_replaced_files(self):
        """New connections get the certificate the files hold now; connections made before
        go on; a half-replaced pair keeps the previous certificate."""
        p = pki()
        if not os.path.exists(p.p("server2.crt")):
            p.issue("server2", "server_ext")
        d = tempfile.mkdtemp(prefix="keelson-it-reload-")
        self.addCleanup(shutil.rmtree, d, True)
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        shutil.copy(p.p("server.crt"), cert)
        shutil.copy(p.p("server.key"), key)
        s = start_keelson(self, ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", p.p("ca.crt"),
                                 "--client-cert-auth"])
        self.assertEqual(served_cn(s.client_port), "server")
        self.assertEqual(s.ctl("put", "before", "1").rc, 0)

        # Only the certificate replaced: it does not match the key, so the old pair stays.
        shutil.copy(p.p("server2.crt"), cert + ".tmp")
        os.replace(cert + ".tmp", cert)
        self.assertEqual(served_cn(s.client_port), "server")
        # Then the key: the new pair is served to new connections.
        shutil.copy(p.p("server2.key"), key + ".tmp")
        os.replace(key + ".tmp", key)
        self.assertEqual(served_cn(s.client_port), "server2")
        r = s.ctl("get", "before")
        self.assertEqual((r.rc, r.stdout), (0, "before\n1\n"))
        # And back, written in place this time.
        with open(key, "w") as f:
            f.write(open(p.p("server.key")).read())
        with open(cert, "w") as f:
            f.write(open(p.p("server.crt")).read())
        self.assertEqual(served_cn(s.client_port), "server")
        self.assertIn("reloaded client TLS certificate files", s.log_tail(200))


class SharedPortServer(TLSServer):
    """Listens on http and https client URLs of one port."""

    def args(self):
        a = super().args()
        i = a.index("--listen-client-urls")
        a[i + 1] = "http://127.0.0.1:%d,https://127.0.0.1:%d" % (self.client_port, self.client_port)
        return a


class SharedPort(unittest.TestCase):
    def test_http_and_https_on_one_port(self):
        """--listen-client-urls http://127.0.0.1:P,https://127.0.0.1:P: etcdctl over either
        scheme sees the other's writes, /health answers over both.

        etcd 3.4.23 (the oracle) serves https gRPC and both schemes' HTTP here, but its plaintext
        gRPC on the shared port times out: a goroutine reads the insecure gRPC server variable
        after it is reassigned to the secure one (etcd-io/etcd#15495, fixed for 3.5 by #15517).
        Keelson reports 3.5 and serves it; etcd is held to the rest."""
        for binary, label in ((harness.KEELSON_BIN, "sut"), (harness.ETCD_BIN, "etcd")):
            s = SharedPortServer(binary, ("root",), label, pki().server_flags(client_cert_auth=False))
            checked_cleanup(self, s)
            s.start()
            https = "https://127.0.0.1:%d" % s.client_port
            http = "http://127.0.0.1:%d" % s.client_port
            tls = pki().client("root")
            r = harness.etcdctl(https, *tls, "put", "k", "over-https")
            self.assertEqual(r.rc, 0, (label, r.stderr))
            r = harness.etcdctl(https, *tls, "get", "k")
            self.assertEqual((r.rc, r.stdout), (0, "k\nover-https\n"), (label, r.stderr))
            if label == "sut":
                r = harness.etcdctl(http, "get", "k")
                self.assertEqual((r.rc, r.stdout), (0, "k\nover-https\n"), (label, r.stderr))
                r = harness.etcdctl(http, "put", "k2", "over-http")
                self.assertEqual(r.rc, 0, (label, r.stderr))
                r = harness.etcdctl(https, *tls, "get", "k2")
                self.assertEqual((r.rc, r.stdout), (0, "k2\nover-http\n"), (label, r.stderr))
            # A client without a certificate is still refused on the https side.
            r = harness.etcdctl(https, "--cacert=" + pki().p("ca.crt"), "--dial-timeout=2s",
                                "--command-timeout=3s", "get", "k")
            self.assertNotEqual(r.rc, 0, label)
            for url in (http, https):
                out = subprocess.run(["curl", "-s", "--max-time", "10", "--cacert", pki().p("ca.crt"),
                                      "--cert", pki().p("root.crt"), "--key", pki().p("root.key"),
                                      url + "/health"],
                                     stdout=subprocess.PIPE, timeout=20).stdout.decode()
                self.assertIn('"health":"true"', out, (label, url))
            s.cleanup()


def downgrade_body(action, version):
    """A DowngradeRequest: action (field 1, varint), version (field 2, string)."""
    body = b""
    if action:
        body += b"\x08" + bytes([action])
    v = version.encode()
    if v:
        body += b"\x12" + bytes([len(v)]) + v
    return body


def response_version(resp):
    """The version (field 2) of a DowngradeResponse."""
    i = 0
    while i < len(resp):
        tag, ln = resp[i], resp[i + 1]
        if tag == 0x12:
            return resp[i + 2:i + 2 + ln].decode()
        i += 2 + ln
    return ""


class Downgrade(harness.ServerTestCase, unittest.TestCase):
    def call(self, action, version):
        with grpc.insecure_channel(self.server.endpoint, options=[("grpc.enable_http_proxy", 0)]) as ch:
            fn = ch.unary_unary("/etcdserverpb.Maintenance/Downgrade")
            try:
                return "OK", response_version(fn(downgrade_body(action, version), timeout=10))
            except grpc.RpcError as e:
                return e.code().name, e.details()

    def test_actions(self):
        """The server reports etcd 3.5.x: 3.4 is the only target etcd would accept."""
        VALIDATE, ENABLE, CANCEL = 0, 1, 2
        wrong = ("INVALID_ARGUMENT", "etcdserver: wrong downgrade target version format")
        invalid = ("INVALID_ARGUMENT", "etcdserver: invalid downgrade target version")
        cases = [
            (VALIDATE, "3.4", ("OK", "3.5.0")),
            (VALIDATE, "3.4.0", ("OK", "3.5.0")),
            (VALIDATE, "3.4.21-rc.1+build", ("OK", "3.5.0")),
            (VALIDATE, "3.3", invalid),
            (VALIDATE, "3.5", invalid),
            (VALIDATE, "3.6.0", invalid),
            (VALIDATE, "4.4", invalid),
            (VALIDATE, "", wrong),
            (VALIDATE, "3", wrong),
            (VALIDATE, "v3.4", wrong),
            (VALIDATE, "3.4.x", wrong),
            (ENABLE, "3.3", invalid),
            (ENABLE, "three", wrong),
            (ENABLE, "3.4", ("UNIMPLEMENTED", "keelson: downgrading a cluster is not supported")),
            (CANCEL, "", ("FAILED_PRECONDITION", "etcdserver: no inflight downgrade job")),
            (CANCEL, "3.4", ("FAILED_PRECONDITION", "etcdserver: no inflight downgrade job")),
            (7, "3.4", ("UNKNOWN", "etcdserver: unknown method")),
        ]
        for action, version, want in cases:
            self.assertEqual(self.call(action, version), want, (action, version))
        self.assertTrue(self.server.alive())


if __name__ == "__main__":
    unittest.main()
