"""The Kubernetes workload profile of the fault campaign (campaign.py --workload k8s|mixed).

What the Kubernetes API server asks of etcd, on a few objects so that clients contend:
- objects live at /registry/<resource>/<namespace>/<name>;
- create  = Txn(If CreateRevision(key) == 0 Then Put(key) Else Get(key));
- update  = Txn(If ModRevision(key) == r Then Put(key) Else Get(key)), r from the client's
            cache (the last response that showed the key);
- delete  = Txn(If ModRevision(key) == r Then DeleteRange(key) Else Get(key));
- get     = a linearizable Range of one key;
- list    = paginated: a linearizable first page (limit N) of /registry/<resource>/, then the
            next pages at the first page's revision (pinned), from the last key + "\\0";
- events  = /registry/events/<namespace>/<unique name>, created with one lease shared by all
            clients (granted at the start, with a TTL longer than the run).

Every txn is recorded as a compare-and-set in the history (linearizability.py): a create
expects None, an update / delete expects the value the client saw at mod revision r (each
value is written once, so "ModRevision == r" and "value == the value at r" agree), a delete
writes None, and a failed txn's Else branch gives the value it read ("observed"). A list is
recorded with its pinned revision and every item; watchcheck.check_lists compares it with
the state the reference watch stream gives at that revision.
"""

import random
import threading
import time

import grpc
from etcd3 import etcdrpc

RESOURCES = ("pods", "configmaps", "deployments")
NAMESPACES = ("default", "kube-system")
NAMES = ("a", "b", "c")
EVENTS_PREFIX = "/registry/events/"
LIST_LIMIT = 2


def object_keys():
    return ["/registry/%s/%s/%s" % (r, ns, n)
            for r in RESOURCES for ns in NAMESPACES for n in NAMES]


def watch_prefixes():
    """The prefixes the per-resource watchers follow (events included)."""
    return ["/registry/%s/" % r for r in RESOURCES] + [EVENTS_PREFIX]


def prefix_end(prefix):
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b)


def grant_shared_lease(c, ttl):
    """Grants the lease every event is written with, through any live member (retried: a
    member may be between elections). Returns its id."""
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        for m in c.live():
            ch = grpc.insecure_channel(m.endpoint)
            try:
                r = etcdrpc.LeaseStub(ch).LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=ttl),
                                                     timeout=5)
                return r.ID
            except grpc.RpcError as e:
                last = e
            finally:
                ch.close()
        time.sleep(0.2)
    raise RuntimeError("could not grant the shared events lease: %s" % last)


class K8sClient(threading.Thread):
    """One API-server-like client: optimistic-concurrency txns on /registry/..., paginated
    lists, event creation with the shared lease. Records its ops into rec (campaign.Recorder)."""

    def __init__(self, cid, c, rec, stop, seed, timeout, lease_id):
        super().__init__(daemon=True)
        self.cid, self.c, self.rec, self.stop = cid, c, rec, stop
        self.rnd = random.Random(seed)
        self.timeout = timeout
        self.lease_id = lease_id
        self.stubs = {}
        self.cache = {}       # key -> (value or None, mod_revision) as last seen
        self.counter = 0
        self.keys = object_keys()

    def stub(self, m):
        s = self.stubs.get(m.name)
        if s is None:
            ch = grpc.insecure_channel(m.endpoint)
            s = self.stubs[m.name] = (ch, etcdrpc.KVStub(ch))
        return s[1]

    def value(self):
        self.counter += 1
        return "k%d-%d" % (self.cid, self.counter)

    def run(self):
        while not self.stop.is_set():
            m = self.rnd.choice(self.c.members)
            key = self.rnd.choice(self.keys)
            r = self.rnd.random()
            cached = self.cache.get(key)
            if r < 0.2:
                self.txn(m, key, "create")
            elif r < 0.45:
                if cached is None or cached[0] is None:
                    self.get(m, key)
                else:
                    self.txn(m, key, "update")
            elif r < 0.55:
                if cached is None or cached[0] is None:
                    self.get(m, key)
                else:
                    self.txn(m, key, "delete")
            elif r < 0.7:
                self.get(m, key)
            elif r < 0.85:
                self.list(m, "/registry/%s/" % self.rnd.choice(RESOURCES))
            else:
                ns = self.rnd.choice(NAMESPACES)
                self.txn(m, "%s%s/ev-%d-%d" % (EVENTS_PREFIX, ns, self.cid, self.counter + 1),
                         "event")
        for ch, _ in self.stubs.values():
            ch.close()

    def _fail(self, op, e, record):
        op["end"] = None
        op["ok"] = False
        try:
            op["error"] = "%s: %s" % (e.code().name, e.details())
        except Exception:  # noqa
            op["error"] = str(e)[:200]
        if "database space exceeded" in op["error"]:
            op["refused"] = True   # NOSPACE: never applied (watchcheck checks it)
        if record:
            self.rec.add(op)       # a write: indeterminate, may still take effect
        time.sleep(0.02)

    def get(self, m, key):
        op = {"id": self.rec.new_id(), "client": self.cid, "key": key, "op": "get",
              "member": m.name, "start": self.rec.now()}
        try:
            resp = self.stub(m).Range(etcdrpc.RangeRequest(key=key.encode()),
                                      timeout=self.timeout)
        except grpc.RpcError as e:
            self._fail(op, e, False)
            return
        op.update(end=self.rec.now(), ok=True, rev=resp.header.revision)
        if resp.kvs:
            op["result"] = resp.kvs[0].value.decode()
            self.cache[key] = (op["result"], resp.kvs[0].mod_revision)
        else:
            op["result"] = None
            self.cache[key] = (None, 0)
        self.rec.add(op)

    def txn(self, m, key, kind):
        """kind: create, update, delete (on an object) or event (create with the lease)."""
        bkey = key.encode()
        op = {"id": self.rec.new_id(), "client": self.cid, "key": key, "op": "cas",
              "kind": kind, "member": m.name}
        if kind in ("create", "event"):
            op["expect"], op["value"] = None, self.value()
            cmp = etcdrpc.Compare(key=bkey, result=etcdrpc.Compare.EQUAL,
                                  target=etcdrpc.Compare.CREATE, create_revision=0)
        else:
            exp, modrev = self.cache[key]
            op["expect"], op["expect_mod_revision"] = exp, modrev
            op["value"] = self.value() if kind == "update" else None
            cmp = etcdrpc.Compare(key=bkey, result=etcdrpc.Compare.EQUAL,
                                  target=etcdrpc.Compare.MOD, mod_revision=modrev)
        if op["value"] is None:
            then = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=bkey))
        else:
            then = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                key=bkey, value=op["value"].encode(),
                lease=self.lease_id if kind == "event" else 0))
        otherwise = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=bkey))
        req = etcdrpc.TxnRequest(compare=[cmp], success=[then], failure=[otherwise])
        op["start"] = self.rec.now()
        try:
            resp = self.stub(m).Txn(req, timeout=self.timeout)
        except grpc.RpcError as e:
            self._fail(op, e, True)
            self.cache.pop(key, None)   # unknown now: read it again before the next update
            return
        op.update(end=self.rec.now(), ok=True, rev=resp.header.revision,
                  result=bool(resp.succeeded))
        if resp.succeeded:
            if op["value"] is None:
                self.cache[key] = (None, 0)
            else:
                self.cache[key] = (op["value"], resp.header.revision)
        else:
            rr = resp.responses[0].response_range if resp.responses else None
            if rr is not None and rr.kvs:
                op["observed"] = rr.kvs[0].value.decode()
                self.cache[key] = (op["observed"], rr.kvs[0].mod_revision)
            else:
                op["observed"] = None
                self.cache[key] = (None, 0)
        self.rec.add(op)

    def list(self, m, prefix):
        """A paginated list pinned at the first page's revision."""
        op = {"id": self.rec.new_id(), "client": self.cid, "key": prefix, "op": "list",
              "member": m.name, "start": self.rec.now()}
        end = prefix_end(prefix)
        items = []
        pages = 0
        start = prefix.encode()
        rev = 0
        count = None
        try:
            while True:
                req = etcdrpc.RangeRequest(key=start, range_end=end, limit=LIST_LIMIT,
                                           revision=rev)
                resp = self.stub(m).Range(req, timeout=self.timeout)
                pages += 1
                if rev == 0:
                    rev = resp.header.revision
                    op["rev"] = rev        # the first page is a linearizable read
                    count = resp.count
                for kv in resp.kvs:
                    items.append([kv.key.decode(), kv.value.decode(), kv.mod_revision,
                                  kv.create_revision])
                if not resp.more or not resp.kvs:
                    break
                start = resp.kvs[-1].key + b"\0"
                if pages > 100:
                    raise RuntimeError("list of %s: more than 100 pages" % prefix)
        except grpc.RpcError as e:
            self._fail(op, e, False)
            return
        op.update(end=self.rec.now(), ok=True, items=items, pages=pages, count=count)
        for k, v, mr, _ in items:
            self.cache[k] = (v, mr)
        self.rec.add(op)
