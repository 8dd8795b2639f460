"""KV.RangeStream (etcd 3.7) over raw gRPC: every stream, merged message by message as proto
Merge does, must equal the unary Range answer to the same request.

etcd 3.4 (the oracle of the other modules) has no RangeStream, so the oracle here is the
server's own unary Range, which the other modules check against etcd. Also checked: etcd's
message layout (ids first, revision in the first chunk, count and more in the last), that
large ranges really come in several bounded chunks, one revision for the whole stream while
writes go on, the errors of Range, and the linearizable path of a 3-member cluster.

python3-etcd3's generated code predates RangeStreamResponse, so the wrapper (field 1, a
RangeResponse) is taken apart by hand; merging RangeResponse bytes in order is proto Merge.
"""

import threading
import time
import unittest

import grpc
from etcd3.etcdrpc import rpc_pb2 as pb

import cluster
import harness

KV = "/etcdserverpb.KV/"


def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def unwrap(msg):
    """The RangeResponse bytes inside one RangeStreamResponse (field 1, length-delimited)."""
    out = b""
    i = 0
    while i < len(msg):
        tag, i = _varint(msg, i)
        if tag & 7 != 2:
            raise AssertionError("unexpected wire type in RangeStreamResponse: %d" % tag)
        n, i = _varint(msg, i)
        if tag >> 3 == 1:
            out += msg[i:i + n]
        i += n
    return out


class Client:
    def __init__(self, endpoint):
        self.channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.max_receive_message_length", 256 << 20)])
        ident = lambda b: b  # noqa: E731
        self._range = self.channel.unary_unary(KV + "Range", request_serializer=ident,
                                               response_deserializer=ident)
        self._put = self.channel.unary_unary(KV + "Put", request_serializer=ident,
                                             response_deserializer=ident)
        self._del = self.channel.unary_unary(KV + "DeleteRange", request_serializer=ident,
                                             response_deserializer=ident)
        self._compact = self.channel.unary_unary(KV + "Compact", request_serializer=ident,
                                                 response_deserializer=ident)
        self._stream = self.channel.unary_stream(KV + "RangeStream", request_serializer=ident,
                                                 response_deserializer=ident)

    def close(self):
        self.channel.close()

    def put(self, key, value):
        r = pb.PutResponse()
        r.ParseFromString(self._put(pb.PutRequest(key=key, value=value).SerializeToString(),
                                    timeout=10))
        return r.header.revision

    def delete(self, key, end=b""):
        self._del(pb.DeleteRangeRequest(key=key, range_end=end).SerializeToString(), timeout=10)

    def compact(self, rev):
        self._compact(pb.CompactionRequest(revision=rev, physical=True).SerializeToString(),
                      timeout=10)

    def range(self, req):
        r = pb.RangeResponse()
        r.ParseFromString(self._range(req.SerializeToString(), timeout=30))
        return r

    def stream_messages(self, req):
        """Each message of the stream, as a RangeResponse."""
        out = []
        for raw in self._stream(req.SerializeToString(), timeout=60):
            m = pb.RangeResponse()
            m.ParseFromString(unwrap(raw))
            out.append(m)
        return out

    def stream_merged(self, req):
        merged = pb.RangeResponse()
        msgs = self.stream_messages(req)
        for m in msgs:
            merged.MergeFrom(m)
        return merged, msgs


def prefix_end(p):
    return p[:-1] + bytes([p[-1] + 1])


class RangeStreamSingle(harness.ServerTestCase, unittest.TestCase):
    """One member: the cases of Range, merged stream == Range."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.client = None
        if cls._server is None:
            return
        cls.client = Client(cls._server.endpoint)
        c = cls.client
        # Values of varied sizes so that chunks of keys vary in bytes; some keys updated
        # and some deleted so that revisions, versions and tombstones are all there.
        for i in range(600):
            c.put(b"rs/%04d" % i, b"v%d-" % i + b"x" * (i * 37 % 3000))
        cls.mid_rev = c.put(b"rs/0005", b"updated")
        for i in range(0, 600, 7):
            c.delete(b"rs/%04d" % i)
        for i in range(50):
            c.put(b"other/%02d" % i, b"o" * i)
        c.put(b"rs-after", b"z")

    @classmethod
    def tearDownClass(cls):
        if cls.client:
            cls.client.close()
        super().tearDownClass()

    def check(self, **kw):
        req = pb.RangeRequest(**kw)
        want = self.client.range(req)
        got, msgs = self.client.stream_merged(req)
        self.assertEqual(got, want, "merged RangeStream != Range for %r (%d messages)" % (kw, len(msgs)))
        return msgs

    def test_prefix_and_limits(self):
        self.server  # noqa: B018 (fails the test if the server did not start)
        for limit in (0, 1, 5, 9, 10, 11, 30, 31, 300, 514, 515, 516, 10000):
            with self.subTest(limit=limit):
                self.check(key=b"rs/", range_end=prefix_end(b"rs/"), limit=limit)

    def test_from_key_keys_only_count_only(self):
        self.server  # noqa: B018
        self.check(key=b"rs/0100", range_end=b"\0")
        self.check(key=b"\0", range_end=b"\0", limit=77)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), keys_only=True)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), keys_only=True, limit=123)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), count_only=True)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), count_only=True, limit=3)
        self.check(key=b"rs/0003")
        self.check(key=b"rs/0007")  # deleted
        self.check(key=b"nothing/", range_end=prefix_end(b"nothing/"))
        self.check(key=b"rs/0100", range_end=b"rs/0101")

    def test_revision_serializable_sort_filters(self):
        self.server  # noqa: B018
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), revision=self.mid_rev)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), revision=self.mid_rev, limit=40)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), serializable=True, limit=200)
        # Sorted and filtered requests: one message with the whole answer, as etcd.
        msgs = self.check(key=b"rs/", range_end=prefix_end(b"rs/"), limit=20,
                          sort_order=pb.RangeRequest.DESCEND)
        self.assertEqual(len(msgs), 1)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), sort_order=pb.RangeRequest.ASCEND,
                   sort_target=pb.RangeRequest.MOD, limit=15)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), min_mod_revision=self.mid_rev)
        self.check(key=b"rs/", range_end=prefix_end(b"rs/"), max_create_revision=100, limit=7)

    def test_layout_and_chunks(self):
        """etcd's layout; a big range comes in several chunks, none much over the limit."""
        self.server  # noqa: B018
        req = pb.RangeRequest(key=b"rs/", range_end=prefix_end(b"rs/"))
        msgs = self.client.stream_messages(req)
        self.assertGreater(len(msgs), 4, "a 600-key range came in too few chunks")
        first, data = msgs[0], msgs[1:]
        self.assertNotEqual(first.header.cluster_id, 0)
        self.assertNotEqual(first.header.member_id, 0)
        self.assertEqual(first.header.revision, 0)
        self.assertEqual(len(first.kvs), 0)
        self.assertNotEqual(data[0].header.revision, 0)
        for m in data[1:]:
            self.assertFalse(m.HasField("header"))
        for m in data[:-1]:
            self.assertEqual(m.count, 0)
            self.assertFalse(m.more)
        self.assertEqual(data[-1].count, sum(len(m.kvs) for m in data))
        # Chunks start at 10 keys and grow: the first data chunk is small.
        self.assertEqual(len(data[0].kvs), 10)
        self.assertEqual(len(data[1].kvs), 20)

    def test_errors_as_range(self):
        self.server  # noqa: B018
        cases = [
            pb.RangeRequest(key=b""),
            pb.RangeRequest(key=b"rs/", range_end=prefix_end(b"rs/"), revision=1 << 40),
            pb.RangeRequest(key=b"rs/", sort_target=77),
        ]
        for req in cases:
            with self.subTest(req=str(req)):
                with self.assertRaises(grpc.RpcError) as unary:
                    self.client.range(req)
                with self.assertRaises(grpc.RpcError) as stream:
                    self.client.stream_messages(req)
                self.assertEqual(stream.exception.code(), unary.exception.code())
                self.assertEqual(stream.exception.details(), unary.exception.details())
        self.assertTrue(self.server.alive())


class RangeStreamWrites(unittest.TestCase):
    """Writes during a stream: the stream keeps its one revision."""

    def test_concurrent_writes(self):
        s = harness.fresh_server(self, extra_args=("--max-request-bytes", "65536"))
        c = Client(s.endpoint)
        self.addCleanup(c.close)
        for i in range(800):
            c.put(b"cw/%04d" % i, b"%d" % i + b"y" * 500)
        rev = c.put(b"cw/0000", b"first")
        req = pb.RangeRequest(key=b"cw/", range_end=prefix_end(b"cw/"))
        it = c._stream(req.SerializeToString(), timeout=60)
        msgs = []
        for raw in it:  # the ids and the first chunk: the read transaction is open
            m = pb.RangeResponse()
            m.ParseFromString(unwrap(raw))
            msgs.append(m)
            if len(msgs) == 2:
                break
        self.assertEqual(msgs[1].header.revision, rev)
        # Writes and deletes all over the range while the stream is open.
        last = 0
        for i in range(0, 800, 3):
            last = c.put(b"cw/%04d" % i, b"changed")
        c.delete(b"cw/0500", b"cw/0600")
        c.put(b"cw/zzzz-new", b"new")
        for raw in it:
            m = pb.RangeResponse()
            m.ParseFromString(unwrap(raw))
            msgs.append(m)
        merged = pb.RangeResponse()
        for m in msgs:
            merged.MergeFrom(m)
        self.assertGreater(len(msgs), 5)
        want = c.range(pb.RangeRequest(key=b"cw/", range_end=prefix_end(b"cw/"), revision=rev))
        want.header.revision = rev  # Range at a past revision reports the current one
        self.assertEqual(merged, want)
        now = c.range(req)
        self.assertGreater(now.header.revision, last - 1)
        self.assertNotEqual(now.kvs, merged.kvs)
        # Every chunk stays near --max-request-bytes (the adaptive size cuts at 2x).
        for m in msgs:
            self.assertLess(m.ByteSize(), 4 * 65536)

    def test_client_goes_away(self):
        """A client that cancels mid-stream: the member stays up and serves the next one."""
        s = harness.fresh_server(self)
        c = Client(s.endpoint)
        self.addCleanup(c.close)
        big = b"q" * 4000
        for i in range(1500):
            c.put(b"gone/%05d" % i, big)
        req = pb.RangeRequest(key=b"gone/", range_end=prefix_end(b"gone/"))
        for _ in range(3):
            it = c._stream(req.SerializeToString(), timeout=60)
            next(it)
            next(it)
            it.cancel()
        merged, _ = c.stream_merged(req)
        self.assertEqual(merged.count, 1500)
        self.assertEqual(len(merged.kvs), 1500)
        self.assertTrue(s.alive())


    def test_shutdown_during_stream(self):
        """SIGTERM while a client holds a stream open without reading: the member ends the
        stream and exits promptly and cleanly (its reading thread must not outlive the store)."""
        s = harness.fresh_server(self, extra_args=("--max-request-bytes", "65536"))
        c = Client(s.endpoint)
        self.addCleanup(c.close)
        big = b"s" * 4000
        for i in range(2000):
            c.put(b"sd/%05d" % i, big)
        it = c._stream(pb.RangeRequest(key=b"sd/", range_end=prefix_end(b"sd/")).SerializeToString(),
                       timeout=60)
        next(it)
        next(it)  # the stream thread now waits for the client to take what is queued
        t0 = time.monotonic()
        rc = s.stop(timeout=20)
        self.assertLess(time.monotonic() - t0, 15, "the member took too long to stop")
        self.assertEqual(rc, 0, "exit status %r after SIGTERM\n%s" % (rc, s.log_tail(20)))
        it.cancel()


class RangeStreamAuth(unittest.TestCase):
    """With auth on, RangeStream is gated as Range: same status and message when refused."""

    def test_permissions(self):
        s = harness.fresh_server(self)
        c = Client(s.endpoint)
        self.addCleanup(c.close)
        for i in range(30):
            c.put(b"ok/%02d" % i, b"v")
            c.put(b"no/%02d" % i, b"v")
        for args in (("user", "add", "root:rootpw"), ("role", "add", "reader"),
                     ("role", "grant-permission", "reader", "read", "ok/", "--prefix=true"),
                     ("user", "add", "alice:alicepw"), ("user", "grant-role", "alice", "reader"),
                     ("auth", "enable")):
            r = s.ctl(*args)
            self.assertEqual(r.rc, 0, r)
        auth = c.channel.unary_unary("/etcdserverpb.Auth/Authenticate",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
        ar = pb.AuthenticateResponse()
        ar.ParseFromString(auth(pb.AuthenticateRequest(name="alice", password="alicepw").SerializeToString(),
                                timeout=10))
        md = [("token", ar.token)]

        def both(req, metadata):
            try:
                want = pb.RangeResponse()
                want.ParseFromString(c._range(req.SerializeToString(), timeout=10, metadata=metadata))
                want_err = None
            except grpc.RpcError as e:
                want, want_err = None, (e.code(), e.details())
            try:
                got = pb.RangeResponse()
                for raw in c._stream(req.SerializeToString(), timeout=10, metadata=metadata):
                    m = pb.RangeResponse()
                    m.ParseFromString(unwrap(raw))
                    got.MergeFrom(m)
                got_err = None
            except grpc.RpcError as e:
                got, got_err = None, (e.code(), e.details())
            self.assertEqual(got_err, want_err)
            self.assertEqual(got, want)
            return want_err

        ok = pb.RangeRequest(key=b"ok/", range_end=prefix_end(b"ok/"))
        no = pb.RangeRequest(key=b"no/", range_end=prefix_end(b"no/"))
        self.assertIsNone(both(ok, md))
        self.assertEqual(both(no, md)[0], grpc.StatusCode.PERMISSION_DENIED)
        self.assertIsNotNone(both(ok, None))  # no token: refused as Range is
        self.assertIsNotNone(both(ok, [("token", "not-a-token")]))


class RangeStreamCluster(unittest.TestCase):
    """3 members: a linearizable stream on a follower waits for a read index."""

    def test_follower_linearizable(self):
        cl = cluster.Cluster(size=3, label="rs")
        self.addCleanup(cl.cleanup)
        cl.start()
        leader = cl.wait_leader()
        follower = cl.followers(leader)[0]
        lc = Client(leader.endpoint)
        fc = Client(follower.endpoint)
        self.addCleanup(lc.close)
        self.addCleanup(fc.close)
        done = threading.Event()
        errors = []

        def writer():
            i = 0
            try:
                while not done.is_set():
                    lc.put(b"lin/%05d" % (i % 400), b"w%d" % i)
                    i += 1
            except Exception as e:  # noqa
                errors.append(e)

        for i in range(400):
            lc.put(b"lin/%05d" % i, b"init")
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(5):
                # Linearizable: a write acknowledged before the stream starts is in it.
                rev = lc.put(b"lin/marker", b"m")
                merged, msgs = fc.stream_merged(pb.RangeRequest(
                    key=b"lin/", range_end=prefix_end(b"lin/")))
                self.assertGreaterEqual(merged.header.revision, rev)
                self.assertIn(b"lin/marker", [kv.key for kv in merged.kvs])
                self.assertEqual(merged.count, 401)
                self.assertGreater(len(msgs), 3)
        finally:
            done.set()
            t.join()
        self.assertEqual(errors, [])


if __name__ == "__main__":
    unittest.main()
