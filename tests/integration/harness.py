"""Helpers for Keelson's integration tests.

Starts server processes (Keelson or the real etcd, which take the same flags) on free
127.0.0.1 ports with a temporary data dir, waits until `etcdctl endpoint health` passes,
stops / kills / restarts them, and runs the real `etcdctl` against them.

Environment:
  KEELSON_BIN      server under test (default: <repo>/bazel-bin/server/keelson)
  ETCD_BIN         the oracle, a real etcd 3.4 (default: /usr/bin/etcd)
  ETCDCTL_BIN      the real etcdctl 3.4 (default: /usr/bin/etcdctl)
  KEELSON_SANITIZER_CHECK=1  fail when a stopped server's log shows an ASan/UBSan report
  KEELSON_KEEP_LOGS=1        keep temp dirs (data dirs and server logs) after the run
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))

KEELSON_BIN = os.environ.get("KEELSON_BIN") or os.path.join(
    REPO_ROOT, "bazel-bin", "server", "keelson")
ETCD_BIN = os.environ.get("ETCD_BIN") or "/usr/bin/etcd"
ETCDCTL_BIN = os.environ.get("ETCDCTL_BIN") or "/usr/bin/etcdctl"

START_TIMEOUT = float(os.environ.get("KEELSON_START_TIMEOUT", "30"))
CMD_TIMEOUT = 60.0

# Proxies must never be used for 127.0.0.1 (Go and gRPC-python both honour these).
for _v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
           "ALL_PROXY", "grpc_proxy"):
    os.environ.pop(_v, None)
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"


def clean_env(extra=None):
    """The environment for child processes: no ETCD_*/ETCDCTL_* leaking in from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ETCD_") and not k.startswith("ETCDCTL_")}
    if extra:
        env.update(extra)
    return env


# ---------------------------------------------------------------------------------------
# ports

_port_lock = threading.Lock()
_ports_handed_out = set()


def free_port():
    """A currently free TCP port on 127.0.0.1 not handed out earlier in this run."""
    with _port_lock:
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def port_is_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is ok
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# etcdctl

class Result:
    def __init__(self, argv, rc, out, err, elapsed):
        self.argv, self.rc, self.out, self.err, self.elapsed = argv, rc, out, err, elapsed

    @property
    def stdout(self):
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self):
        return self.err.decode("utf-8", "replace")

    def __repr__(self):
        return "Result(argv=%r, rc=%r, stdout=%r, stderr=%r)" % (
            self.argv, self.rc, self.out[:2000], self.err[:2000])


def etcdctl(endpoint, *args, stdin=None, timeout=CMD_TIMEOUT, env=None):
    """Run the real etcdctl (API v3) against one endpoint. stdin: bytes/str or None."""
    argv = [ETCDCTL_BIN, "--endpoints=" + endpoint] + [str(a) for a in args]
    if isinstance(stdin, str):
        stdin = stdin.encode()
    t0 = time.monotonic()
    p = subprocess.run(argv, input=stdin if stdin is not None else b"",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                       env=clean_env(dict({"ETCDCTL_API": "3"}, **(env or {}))))
    return Result(argv[1:], p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------
# servers

_live_servers = []
_live_lock = threading.Lock()


class ServerError(Exception):
    pass


class ServerTimeout(ServerError):
    pass


# binary -> consecutive start-ups that never became healthy: after 3, fail fast instead of
# waiting START_TIMEOUT in every remaining test
_start_timeouts = {}


class Server:
    """One single-member server process (Keelson or etcd, same flags).

    The data dir lives under a private temp dir that is removed by cleanup().
    Ports are chosen once and kept across restarts.
    """

    def __init__(self, binary=None, name="default", extra_args=(), label=None):
        self.binary = binary or KEELSON_BIN
        self.name = name
        self.extra_args = list(extra_args)
        self.label = label or os.path.basename(self.binary)
        self.tmp = tempfile.mkdtemp(prefix="keelson-it-%s-" % self.label)
        self.data_dir = os.path.join(self.tmp, "data")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc = None
        self.log_path = None
        self._log_file = None
        self._starts = 0
        with _live_lock:
            _live_servers.append(self)

    # -- addresses
    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.client_port

    @property
    def client_url(self):
        return "http://127.0.0.1:%d" % self.client_port

    @property
    def peer_url(self):
        return "http://127.0.0.1:%d" % self.peer_port

    def args(self):
        return [
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", "%s=%s" % (self.name, self.peer_url),
        ] + self.extra_args

    # -- lifecycle
    def start(self, timeout=START_TIMEOUT):
        first = self._starts == 0
        try:
            return self._start(timeout)
        except ServerError:
            # Another process may have taken a port between free_port() and the bind (other
            # test runs on the machine): on a first start, try once more on new ports.
            if not first or self.alive() or "in use" not in self.log_tail(200).lower():
                raise
            self.client_port, self.peer_port = free_port(), free_port()
            shutil.rmtree(self.data_dir, ignore_errors=True)
            return self._start(timeout)

    def _start(self, timeout):
        if self.proc is not None and self.proc.poll() is None:
            raise ServerError("%s already running" % self.label)
        if not os.path.isfile(self.binary) or not os.access(self.binary, os.X_OK):
            raise ServerError("server binary not found or not executable: %s "
                              "(build it with `bazel build //server:keelson`, or set KEELSON_BIN)"
                              % self.binary)
        if _start_timeouts.get(self.binary, 0) >= 3:
            raise ServerError("not starting %s: its last %d start-ups never became healthy "
                              "(see the first failures)" % (self.binary,
                                                            _start_timeouts[self.binary]))
        self._starts += 1
        self.log_path = os.path.join(self.tmp, "server-%d.log" % self._starts)
        self._log_file = open(self.log_path, "wb")
        env = clean_env()
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        self.proc = subprocess.Popen([self.binary] + self.args(), stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=self.tmp, env=env, start_new_session=True)
        try:
            self.wait_healthy(timeout)
        except ServerTimeout:
            self.kill9()
            _start_timeouts[self.binary] = _start_timeouts.get(self.binary, 0) + 1
            raise
        _start_timeouts[self.binary] = 0
        return self

    def wait_healthy(self, timeout=START_TIMEOUT):
        """Poll `etcdctl endpoint health` until it passes; fail fast if the process died."""
        deadline = time.monotonic() + timeout
        last = None
        # First wait for the client port to accept connections: etcdctl run too early spends
        # its whole dial timeout retrying.
        while not self._port_open() and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        while True:
            if self.proc.poll() is not None:
                raise ServerError("%s exited with status %s during start-up\n%s" % (
                    self.label, self.proc.returncode, self.log_tail()))
            try:
                last = etcdctl(self.endpoint, *getattr(self, "health_args", ()), "--dial-timeout=1s",
                               "--command-timeout=2s", "endpoint", "health", timeout=10)
                if last.rc == 0:
                    return
            except subprocess.TimeoutExpired:
                last = None
            if time.monotonic() > deadline:
                raise ServerTimeout("%s not healthy after %.0fs; last health check: %r\n%s" % (
                    self.label, timeout, last, self.log_tail()))
            time.sleep(0.05)

    def _port_open(self):
        try:
            socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=15):
        """Graceful stop (SIGTERM, then SIGKILL after timeout). Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self._reaped()

    def kill9(self):
        """SIGKILL, no chance to flush anything."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return self._reaped()

    def restart(self, kill=False, timeout=START_TIMEOUT):
        if kill:
            self.kill9()
        else:
            running = self.proc is not None and self.proc.poll() is None
            rc = self.stop()
            # etcd re-raises SIGTERM after its shutdown; anything else (an abort, a crash
            # while shutting down) is a failure of the server under test
            if running and rc not in (0, -signal.SIGTERM):
                raise ServerError("%s: exit status %r after SIGTERM\n%s" % (
                    self.label, rc, self.log_tail(20)))
        self._wait_ports_free()
        return self.start(timeout)

    def _wait_ports_free(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_is_free(self.client_port) and port_is_free(self.peer_port):
                return
            time.sleep(0.05)

    def _reaped(self):
        rc = self.proc.returncode
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return rc

    def sanitizer_report(self):
        """ASan/UBSan/LSan findings in any of this server's logs, or ''."""
        found = []
        for i in range(1, self._starts + 1):
            p = os.path.join(self.tmp, "server-%d.log" % i)
            try:
                with open(p, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                           "runtime error:", "ERROR: UndefinedBehaviorSanitizer"):
                if marker in text:
                    idx = text.index(marker)
                    found.append("%s: %s" % (p, text[max(0, idx - 200):idx + 3000]))
                    break
        return "\n".join(found)

    def log_tail(self, n=40):
        if not self.log_path:
            return "(no log)"
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "---- last %d lines of %s ----\n%s" % (n, self.log_path, "\n".join(lines[-n:]))

    def ctl(self, *args, **kw):
        return etcdctl(self.endpoint, *args, **kw)

    def cleanup(self, graceful=True):
        try:
            if graceful:
                self.stop(timeout=5)
            else:
                self.kill9()
        finally:
            with _live_lock:
                if self in _live_servers:
                    _live_servers.remove(self)
            if os.environ.get("KEELSON_KEEP_LOGS") != "1":
                shutil.rmtree(self.tmp, ignore_errors=True)


def start_pair(sut_binary=None, oracle_binary=None, extra_args=()):
    """Start the server under test and a real etcd side by side (in parallel).

    Returns (sut, oracle). On failure both are cleaned up and the error is raised.
    """
    sut = Server(sut_binary or KEELSON_BIN, extra_args=extra_args, label="sut")
    oracle = Server(oracle_binary or ETCD_BIN, extra_args=extra_args, label="etcd")
    errors = {}

    def go(s):
        try:
            s.start()
        except Exception as e:  # noqa
            errors[s.label] = e

    ts = [threading.Thread(target=go, args=(s,)) for s in (sut, oracle)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        sut.cleanup()
        oracle.cleanup()
        raise ServerError("; ".join("%s: %s" % kv for kv in errors.items()))
    return sut, oracle


def pair_for_test(testcase, extra_args=()):
    """start_pair() for one test; both cleaned up (and the SUT sanitizer-checked) after it."""
    sut, oracle = start_pair(extra_args=extra_args)

    def done():
        report = sut.sanitizer_report() if os.environ.get(
            "KEELSON_SANITIZER_CHECK") == "1" else ""
        sut.cleanup()
        oracle.cleanup()
        if report:
            raise AssertionError("sanitizer report from server:\n" + report)

    testcase.addCleanup(done)
    return sut, oracle


def poll(fn, timeout, interval=0.05, what="condition"):
    """Call fn() until it returns a truthy value and return it, or raise AssertionError after
    timeout. An exception, or a tuple (a "not yet" with its details), counts as not reached;
    the last one is in the message."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
        except Exception as e:  # noqa
            last = e
        if last is True or (last and not isinstance(last, (Exception, tuple))):
            return last
        if time.monotonic() > deadline:
            raise AssertionError("%s not reached in %.1fs (last: %r)" % (what, timeout, last))
        time.sleep(interval)


def cleanup_all():
    with _live_lock:
        servers = list(_live_servers)
    for s in servers:
        try:
            s.cleanup(graceful=False)
        except Exception:  # noqa
            pass


atexit.register(cleanup_all)


def _on_signal(signum, frame):
    cleanup_all()
    sys.exit(128 + signum)


for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    try:
        signal.signal(_sig, _on_signal)
    except (ValueError, OSError):
        pass


# ---------------------------------------------------------------------------------------
# unittest support: one shared server per test class, failures reported per test

class ServerTestCase:
    """Mixin for unittest.TestCase: a server shared by the class, started lazily.

    If the server cannot start, every test of the class fails (rather than one class-level
    error), so the counts in the summary stay meaningful before Keelson exists.
    """
    server_binary = None
    server_args = ()
    _server = None
    _server_error = None

    @classmethod
    def setUpClass(cls):
        cls._server = None
        cls._server_error = None
        try:
            cls._server = Server(cls.server_binary or KEELSON_BIN,
                                 extra_args=cls.server_args, label="sut").start()
        except Exception as e:  # noqa
            cls._server_error = e
            if cls._server is not None:
                cls._server.cleanup()
                cls._server = None

    @classmethod
    def tearDownClass(cls):
        if cls._server is not None:
            report = cls._server.sanitizer_report() if os.environ.get(
                "KEELSON_SANITIZER_CHECK") == "1" else ""
            cls._server.cleanup()
            cls._server = None
            if report:
                raise AssertionError("sanitizer report from server:\n" + report)

    @property
    def server(self):
        if self._server_error is not None:
            raise ServerError("shared server did not start: %s" % (self._server_error,))
        if self._server is None:
            raise ServerError("shared server not available")
        return self._server


def fresh_server(testcase, binary=None, extra_args=()):
    """A private server for one test, cleaned up (and sanitizer-checked) with the test."""
    s = Server(binary or KEELSON_BIN, extra_args=extra_args, label="sut")

    def done():
        report = s.sanitizer_report() if os.environ.get("KEELSON_SANITIZER_CHECK") == "1" else ""
        s.cleanup()
        if report:
            raise AssertionError("sanitizer report from server:\n" + report)

    testcase.addCleanup(done)
    return s.start()
