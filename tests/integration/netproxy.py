"""A test-controlled TCP proxy on the peer links of a cluster: partitions, one-way drops,
delays and cut connections between members (issue 10, issue 4's partition tests).

Each member gets a proxy listener; the member ADVERTISES the proxy's address as its peer URL
(--initial-advertise-peer-urls, --initial-cluster) and LISTENS on its real peer port
(--listen-peer-urls), so every peer connection to a member passes through its listener here.

    p = NetProxy()                               # an asyncio loop in a daemon thread
    port = p.add_member("m1", real_peer_port)    # the port to advertise for m1
    p.set_ids({member_id: "m1", ...})            # ids as the members compute them
    p.set("m1", "m2", "drop")                    # messages m1 -> m2 are lost (one way)
    p.isolate("m3"); p.partition(["m1", "m2"], ["m3", "m4", "m5"]); p.heal()
    p.close()

A connection carries the messages of one ordered pair (sender, receiver), learned from its
first bytes:
- Keelson (server/peer.h, WIRE FORMAT): the dialer sends a HELLO frame with the sender and
  receiver member ids and then only its own messages; the acceptor answers with one ACK.
- etcd (so that KEELSON_BIN=/usr/bin/etcd checks the tests themselves): HTTP requests with
  the X-Server-From header (the dialer's id). A `GET /raft/stream/...` carries messages from
  the acceptor to the dialer in its response; other requests (POST /raft, snapshots) carry
  the dialer's messages to the acceptor. Requests without that header (probes, /members,
  /version) count as coming from an unknown sender: they are treated as dropped when any
  rule drops or cuts something towards that member.

Rules per ordered pair (sender, receiver), applied to both byte directions of the pair's
connections, existing ones included:
- "pass"  forward;
- "drop"  keep the connection open but discard every byte (a silent network): when the
          rule changes back, a connection that lost bytes is closed (its framing is gone),
          and the member redials;
- "delay" forward each chunk `delay_ms` after it arrived (order kept);
- "cut"   close the pair's connections and close new ones right after their first bytes.
"""

import asyncio
import hashlib
import re
import struct
import threading
import time

MODES = ("pass", "drop", "delay", "cut")


def member_id(peer_urls, token):
    """A member's id as etcd and Keelson compute it at bootstrap: the first 8 bytes (big
    endian) of sha1(sorted peer URLs concatenated + cluster token)."""
    b = "".join(sorted(peer_urls)).encode() + token.encode()
    return struct.unpack(">Q", hashlib.sha1(b).digest()[:8])[0]


class _Conn:
    def __init__(self, proxy, receiver):
        self.proxy = proxy
        self.receiver = receiver   # the member whose listener accepted it
        self.src = None            # message direction, once identified
        self.dst = None
        self.kind = "?"
        self.lost = False          # bytes were discarded: close when the rule lifts
        self.writers = []
        self.closed = False

    def link(self):
        return (self.src, self.dst)

    def close(self):
        if self.closed:
            return
        self.closed = True
        for w in self.writers:
            try:
                w.close()
            except Exception:  # noqa
                pass


class NetProxy:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.ids = {}        # member id -> name
        self.members = {}    # name -> (listen port, target port)
        self.servers = {}    # name -> asyncio server
        self.rules = {}      # (src, dst) -> (mode, delay_ms)
        self.conns = set()
        self.counters = {}   # (src, dst) -> {"forwarded": n, "dropped": n, "cut": n}
        self._thread = threading.Thread(target=self._run, daemon=True, name="netproxy")
        self._thread.start()

    # -- thread plumbing
    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, fn, *args):
        """Run fn(*args) on the proxy's loop and return its result."""
        async def wrap():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(10)

    def _await(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    # -- configuration (any thread)
    def add_member(self, name, target_port, listen_port=0):
        """Listen for connections to member `name` (forwarded to 127.0.0.1:target_port);
        returns the listening port (listen_port, or a free one if 0)."""
        async def go():
            srv = await asyncio.start_server(
                lambda r, w: self._accept(name, r, w), "127.0.0.1", listen_port,
                reuse_address=True)
            self.servers[name] = srv
            port = srv.sockets[0].getsockname()[1]
            self.members[name] = (port, target_port)
            return port
        return self._await(go())

    def set_target(self, name, target_port):
        def go():
            port, _ = self.members[name]
            self.members[name] = (port, target_port)
        self._call(go)

    def set_ids(self, ids):
        """{member id (int): name}: how senders and receivers are named in HELLO frames."""
        self._call(self.ids.update, dict(ids))

    def set(self, src, dst, mode, delay_ms=0):
        """The rule for messages from src to dst (member names)."""
        if mode not in MODES:
            raise ValueError("mode must be one of %s" % (MODES,))
        self._call(self._set, src, dst, mode, delay_ms)

    def _set(self, src, dst, mode, delay_ms):
        if mode == "pass":
            self.rules.pop((src, dst), None)
        else:
            self.rules[(src, dst)] = (mode, delay_ms)
        self._apply()

    def _apply(self):
        for c in list(self.conns):
            if c.src is None and c.dst is None:
                continue   # not identified yet: decided when it is
            mode = self._mode(c)[0]
            if mode == "cut" or (c.lost and mode != "drop"):
                self._count(c, "cut")
                c.close()

    def isolate(self, name, mode="drop"):
        """Every message to and from name is lost (or cut)."""
        def go():
            for other in self.members:
                if other != name:
                    self._set(name, other, mode, 0)
                    self._set(other, name, mode, 0)
        self._call(go)

    def partition(self, *groups, mode="drop"):
        """Messages between different groups (lists of names) are lost; inside a group,
        and for members in no group, nothing changes."""
        def go():
            for i, a in enumerate(groups):
                for j, b in enumerate(groups):
                    if i == j:
                        continue
                    for x in a:
                        for y in b:
                            self._set(x, y, mode, 0)
        self._call(go)

    def heal(self):
        """Every rule back to pass; connections that lost bytes are closed."""
        def go():
            self.rules.clear()
            self._apply()
        self._call(go)

    def stats(self):
        return self._call(lambda: {k: dict(v) for k, v in self.counters.items()})

    def close(self):
        async def go():
            for srv in self.servers.values():
                srv.close()
            for c in list(self.conns):
                c.close()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self._await(go())
        except Exception:  # noqa
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    # -- the proxy itself (loop thread)
    def _mode(self, c):
        if c.src is None:
            # an unknown sender: blocked if anything towards its receiver is blocked
            for (s, d), (mode, delay) in self.rules.items():
                if d == c.dst and mode in ("drop", "cut"):
                    return mode, 0
            return "pass", 0
        return self.rules.get((c.src, c.dst), ("pass", 0))

    def _count(self, c, what, n=1):
        d = self.counters.setdefault(c.link(), {"forwarded": 0, "dropped": 0, "cut": 0})
        d[what] += n

    async def _accept(self, name, reader, writer):
        c = _Conn(self, name)
        self.conns.add(c)
        up_w = None
        try:
            target = self.members[name][1]
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                return   # the member is down: so is the connection
            c.writers = [writer, up_w]
            head = await self._identify(c, reader)
            if head is None:
                return
            if self._mode(c)[0] == "cut":
                self._count(c, "cut")
                return
            await asyncio.gather(self._pump(c, reader, up_w, head),
                                 self._pump(c, up_r, writer, b""))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            c.close()
            self.conns.discard(c)

    async def _identify(self, c, reader):
        """Reads the first bytes of a connection until its sender is known. Returns them
        (to be forwarded), or None if the connection ended first."""
        buf = b""
        deadline = time.monotonic() + 5
        while True:
            if len(buf) >= 8 and buf[4:8] == b"KLSN":
                if len(buf) >= 4 + 32:
                    sender, receiver = struct.unpack(">QQ", buf[4 + 16:4 + 32])
                    c.kind = "keelson"
                    c.src = self.ids.get(sender, "id:%x" % sender)
                    c.dst = self.ids.get(receiver, c.receiver)
                    return buf
            elif len(buf) >= 4 and re.match(rb"^[A-Z]+ ", buf):
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    c.kind = "http"
                    m = re.search(rb"\r\nX-Server-From: *([0-9a-fA-F]+)", buf[:end])
                    dialer = self.ids.get(int(m.group(1), 16)) if m else None
                    if dialer is not None and buf.startswith(b"GET /raft/stream"):
                        c.src, c.dst = c.receiver, dialer
                    else:
                        c.src, c.dst = dialer, c.receiver
                    return buf
            elif len(buf) >= 8:
                c.kind = "other"   # unknown protocol: an unknown sender
                c.dst = c.receiver
                return buf
            if len(buf) > 16384 or time.monotonic() > deadline:
                c.kind = "other"
                c.dst = c.receiver
                return buf
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except asyncio.TimeoutError:
                chunk = b""
                deadline = 0
                if not buf:
                    return None
                continue
            if not chunk:
                return None
            buf += chunk

    async def _pump(self, c, reader, writer, first):
        queue = asyncio.Queue()
        done = object()

        async def sender():
            while True:
                item = await queue.get()
                if item is done:
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if c.closed:
                    return
                writer.write(data)
                await writer.drain()

        task = asyncio.ensure_future(sender())
        try:
            data = first
            while True:
                if data:
                    mode, delay = self._mode(c)
                    if mode == "cut":
                        self._count(c, "cut")
                        c.close()
                        break
                    if mode == "drop":
                        c.lost = True
                        self._count(c, "dropped", len(data))
                    else:
                        self._count(c, "forwarded", len(data))
                        due = time.monotonic() + (delay / 1000.0 if mode == "delay" else 0)
                        queue.put_nowait((due, data))
                if c.closed:
                    break
                data = await reader.read(65536)
                if not data:
                    break
            queue.put_nowait(done)
            await task
        finally:
            if not task.done():
                task.cancel()
            c.close()
