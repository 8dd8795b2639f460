"""A multi-member cluster of server processes on 127.0.0.1, built on harness.py.

    c = Cluster(3).start()            # spawns every member, waits for one agreed leader
    ldr = c.leader()                  # the Member that is leader (polls, bounded)
    c.kill9(ldr); c.restart(ldr)      # kill -9 / restart (same ports, same data dir)
    c.pause(m); c.resume(m)           # SIGSTOP / SIGCONT
    c.cleanup()                       # always: resumes, kills, removes temp dirs

    c = Cluster(3, proxy=True).start()  # peer links through a NetProxy (netproxy.py):
    c.proxy.isolate("m2"); c.proxy.set("m1", "m3", "drop"); c.proxy.heal()

Peer TLS: Cluster(3, peer_tls=lambda m: ["--peer-cert-file", ...]) gives every member https
peer URLs and the flags the function returns for it (called at each start).

Members take etcd's cluster flags (--initial-cluster, --initial-cluster-state,
--initial-cluster-token, --heartbeat-interval, --election-timeout), so the same code runs
the real etcd (KEELSON_BIN=/usr/bin/etcd) to check the tests themselves.

Every started member is registered with harness' process list, so it is killed at exit even
when a test forgets.
"""

import json
import os
import signal
import subprocess
import threading
import time

import harness
import netproxy
from harness import etcdctl, clean_env

HEARTBEAT_MS = int(os.environ.get("KEELSON_CLUSTER_HEARTBEAT_MS", "50"))
ELECTION_MS = int(os.environ.get("KEELSON_CLUSTER_ELECTION_MS", "500"))


class ClusterError(Exception):
    pass


class Member(harness.Server):
    """One member of a Cluster. Ports and data dir are kept across restarts."""

    def __init__(self, cluster, name, binary=None, extra_args=()):
        super().__init__(binary or cluster.binary, name=name, extra_args=extra_args,
                         label="%s-%s" % (cluster.label, name))
        self.cluster = cluster
        self.state = "new"          # --initial-cluster-state for the next start
        self.initial_cluster = None  # None: the cluster's current member list
        self.paused = False
        self.member_id = None        # hex string, learned from endpoint status / member list
        self.proxy_port = None       # the cluster's NetProxy listener for this member, if any
        self.env = {}                # extra environment for the process (e.g. LD_PRELOAD)

    @property
    def advertise_peer_url(self):
        """The peer URL the others use: the proxy's listener when there is a proxy."""
        if self.proxy_port is not None:
            return "http://127.0.0.1:%d" % self.proxy_port
        return self.peer_url

    @property
    def peer_url(self):
        url = super().peer_url
        return url.replace("http://", "https://", 1) if self.cluster.peer_tls else url

    def args(self):
        ic = self.initial_cluster or self.cluster.initial_cluster()
        return [
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.advertise_peer_url,
            "--initial-cluster", ic,
            "--initial-cluster-state", self.state,
            "--initial-cluster-token", self.cluster.token,
            "--heartbeat-interval", str(self.cluster.heartbeat_ms),
            "--election-timeout", str(self.cluster.election_ms),
        ] + (list(self.cluster.peer_tls(self)) if self.cluster.peer_tls else []) + self.extra_args

    def spawn(self):
        """Start the process without waiting for health (a lone member of a new cluster
        never becomes healthy before a quorum is up)."""
        if self.proc is not None and self.proc.poll() is None:
            raise harness.ServerError("%s already running" % self.label)
        if not os.path.isfile(self.binary) or not os.access(self.binary, os.X_OK):
            raise harness.ServerError("server binary not found or not executable: %s"
                                      % self.binary)
        self._starts += 1
        self.paused = False
        self.log_path = os.path.join(self.tmp, "server-%d.log" % self._starts)
        self._log_file = open(self.log_path, "wb")
        env = clean_env(self.env)
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        self.proc = subprocess.Popen([self.binary] + self.args(), stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=self.tmp, env=env, start_new_session=True)
        return self

    def pause(self):
        if self.alive() and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self):
        if self.proc is not None and self.paused:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused = False

    def stop(self, timeout=15):
        self.resume()
        return super().stop(timeout)

    def kill9(self):
        rc = super().kill9()
        self.paused = False
        return rc

    def status(self, timeout=3):
        """`endpoint status -w json` of this member alone: the Status dict, or None."""
        if not self.alive() or self.paused:
            return None
        try:
            r = etcdctl(self.endpoint, "--dial-timeout=1s", "--command-timeout=%ds" % timeout,
                        "endpoint", "status", "-w", "json", timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return None
        if r.rc != 0:
            return None
        try:
            st = json.loads(r.stdout)[0]["Status"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        mid = st.get("header", {}).get("member_id")
        if mid:
            self.member_id = "%x" % mid
        return st

    def __repr__(self):
        return "<Member %s %s%s>" % (self.name, self.endpoint,
                                     "" if self.alive() else " (down)")


class Cluster:
    def __init__(self, size=3, binary=None, label="c", token=None,
                 heartbeat_ms=HEARTBEAT_MS, election_ms=ELECTION_MS, extra_args=(),
                 proxy=False, peer_tls=None):
        """proxy=True: every peer link passes through self.proxy, a netproxy.NetProxy."""
        self.binary = binary or harness.KEELSON_BIN
        self.peer_tls = peer_tls  # None: http peer URLs; else member -> TLS flags
        self.label = label
        self.token = token or "keelson-test-%d-%d" % (os.getpid(), int(time.time() * 1000))
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.members = []
        self.proxy = netproxy.NetProxy() if proxy else None
        for i in range(size):
            self.members.append(self._behind_proxy(
                Member(self, "m%d" % (i + 1), extra_args=extra_args)))
        if self.proxy is not None:
            self.proxy.set_ids({netproxy.member_id([m.advertise_peer_url], self.token): m.name
                                for m in self.members})

    def _behind_proxy(self, m):
        if self.proxy is not None:
            m.proxy_port = self.proxy.add_member(m.name, m.peer_port, harness.free_port())
        return m

    def learn_proxy_ids(self):
        """Teach the proxy the member ids of `member list` (members added at run time get
        ids the test cannot compute)."""
        if self.proxy is None:
            return
        for m in self.live():
            r = m.ctl("member", "list", "-w", "json", timeout=20)
            if r.rc != 0:
                continue
            ids = {}
            for x in json.loads(r.stdout).get("members", []):
                for u in x.get("peerURLs", []):
                    for mm in self.members:
                        if mm.advertise_peer_url == u:
                            ids[x["ID"]] = mm.name
            self.proxy.set_ids(ids)
            return

    # -- addresses
    def initial_cluster(self, members=None):
        return ",".join("%s=%s" % (m.name, m.advertise_peer_url)
                        for m in (members or self.members))

    def endpoints(self, members=None):
        return ",".join(m.endpoint for m in (members or self.members))

    def live(self):
        return [m for m in self.members if m.alive() and not m.paused]

    def by_name(self, name):
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    # -- lifecycle
    def start(self, timeout=harness.START_TIMEOUT):
        try:
            for m in self.members:
                m.spawn()
            self.wait_leader(timeout)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def add_member_object(self, name, extra_args=()):
        """A new Member object (not started, not yet in the cluster's config)."""
        m = self._behind_proxy(Member(self, name, extra_args=extra_args))
        m.state = "existing"
        self.members.append(m)
        return m

    def wait_healthy(self, members=None, timeout=harness.START_TIMEOUT):
        """`endpoint health` (a linearizable read) passes on each of members (default: live)."""
        members = members or self.live()
        deadline = time.monotonic() + timeout
        pending = list(members)
        last = {}
        while pending:
            for m in list(pending):
                if not m.alive():
                    raise ClusterError("%s exited (status %s)\n%s" % (
                        m.label, m.proc.returncode if m.proc else None, m.log_tail()))
                try:
                    r = etcdctl(m.endpoint, "--dial-timeout=1s", "--command-timeout=2s",
                                "endpoint", "health", timeout=10)
                    last[m.name] = r
                    if r.rc == 0:
                        pending.remove(m)
                except subprocess.TimeoutExpired:
                    pass
            if not pending:
                break
            if time.monotonic() > deadline:
                raise ClusterError("not healthy after %.0fs: %s; last: %r\n%s" % (
                    timeout, pending, [last.get(m.name) for m in pending],
                    "\n".join(m.log_tail(20) for m in pending)))
            time.sleep(0.05)

    def statuses(self, members=None):
        """{member: Status dict or None} for members (default: live), queried in parallel."""
        members = members if members is not None else self.live()
        out = {}

        def q(m):
            out[m] = m.status()

        ts = [threading.Thread(target=q, args=(m,)) for m in members]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return out

    def find_leader(self, members=None):
        """The leader Member if every answering live member agrees on one, else None."""
        members = members if members is not None else self.live()
        sts = self.statuses(members)
        leaders = set()
        for m, st in sts.items():
            if st is None:
                return None
            leaders.add(st.get("leader", 0))
        if len(leaders) != 1 or 0 in leaders:
            return None
        lid = "%x" % leaders.pop()
        for m in self.members:
            if m.member_id == lid and m.alive() and not m.paused:
                return m
        return None

    def wait_leader(self, timeout=harness.START_TIMEOUT, members=None, exclude=()):
        """Poll until the live members (or members) agree on a leader not in exclude."""
        deadline = time.monotonic() + timeout
        while True:
            ldr = self.find_leader(members)
            if ldr is not None and ldr not in exclude:
                return ldr
            if time.monotonic() > deadline:
                sts = self.statuses(members)
                raise ClusterError("no agreed leader after %.1fs: %s\n%s" % (
                    timeout, {m.name: (st and {"leader": "%x" % st.get("leader", 0),
                                               "term": st.get("raftTerm"),
                                               "index": st.get("raftIndex")})
                              for m, st in sts.items()},
                    "\n".join(m.log_tail(15) for m in self.members if m.proc)))
            time.sleep(0.05)

    def leader(self, timeout=10):
        return self.wait_leader(timeout)

    def followers(self, leader=None):
        leader = leader or self.leader()
        return [m for m in self.live() if m is not leader]

    def wait_converged(self, timeout=15, members=None):
        """Until members (default: live) report the same raftIndex and revision.
        Returns the agreed (raftIndex, revision)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            sts = self.statuses(members)
            vals = set()
            ok = True
            for m, st in sts.items():
                if st is None:
                    ok = False
                    break
                vals.add((st.get("raftIndex"), st.get("header", {}).get("revision")))
            last = {m.name: st and (st.get("raftIndex"), st.get("raftAppliedIndex"),
                                    st.get("header", {}).get("revision"))
                    for m, st in sts.items()}
            if ok and len(vals) == 1:
                return vals.pop()
            if time.monotonic() > deadline:
                raise ClusterError("members did not converge in %.0fs: %s "
                                   "(raftIndex, raftAppliedIndex, revision)" % (timeout, last))
            time.sleep(0.1)

    def hashkv(self, members=None, rev=None):
        """{member name: (hash, hash_revision, compact_revision)} via `endpoint hashkv`."""
        out = {}
        for m in (members or self.live()):
            args = ["endpoint", "hashkv", "-w", "json"]
            if rev is not None:
                args.append("--rev=%d" % rev)
            r = m.ctl(*args, timeout=20)
            if r.rc != 0:
                raise ClusterError("hashkv on %s failed: %r" % (m.name, r))
            h = json.loads(r.stdout)[0]["HashKV"]
            out[m.name] = (h.get("hash"), h.get("header", {}).get("revision"),
                           h.get("compact_revision", 0))
        return out

    # -- faults
    def kill9(self, m):
        return m.kill9()

    def pause(self, m):
        m.pause()

    def resume(self, m):
        m.resume()

    def restart(self, m, wait=True, timeout=harness.START_TIMEOUT):
        """Restart a member (kill -9 first if it is still running) with the same data dir."""
        if m.alive():
            m.kill9()
        m._wait_ports_free()
        # (etcd ignores --initial-cluster-state once the data dir exists)
        m.spawn()
        if wait:
            self.wait_healthy([m], timeout=timeout)
        return m

    def cleanup(self):
        if self.proxy is not None:
            self.proxy.close()
        for m in self.members:
            try:
                m.resume()
            except Exception:  # noqa
                pass
        for m in self.members:
            try:
                m.cleanup(graceful=False)
            except Exception:  # noqa
                pass

    def logs(self, n=30):
        return "\n".join(m.log_tail(n) for m in self.members if m.log_path)


def etcd3_client(member, timeout=5):
    """A python3-etcd3 client for one member."""
    import etcd3
    return etcd3.client(host="127.0.0.1", port=member.client_port, timeout=timeout)
