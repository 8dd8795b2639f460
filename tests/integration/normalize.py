"""Normalization of etcdctl results, so that two servers' answers can be compared exactly.

What legitimately differs between two servers fed the same commands:
  - the endpoint (each server listens on its own port),
  - cluster_id, member_id, raft_term in response headers (json, fields, protobuf outputs),
  - etcdctl's own client-side log lines: timestamp and a random client id,
  - `endpoint health`: the time the proposal took,
  - `endpoint status`: member id, version (Keelson reports a 3.5-compatible version),
    db size, raft term/index/applied index. Endpoint, revision, is-leader (whether the
    leader is the member itself), is-learner and errors must match.
Everything else must be byte-identical.
"""

import json
import re

# ---------------------------------------------------------------------------------------
# protobuf wire format (just enough to rewrite response headers)


class ProtoError(Exception):
    pass


def _varint(buf, i):
    shift = 0
    val = 0
    while True:
        if i >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        if not b & 0x80:
            return val, i
        shift += 7
        if shift > 70:
            raise ProtoError("varint too long")


def _enc_varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_fields(buf):
    """[(field_number, wire_type, value)]: value is int for varint/fixed, bytes otherwise."""
    out = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        fn, wt = key >> 3, key & 7
        if fn == 0:
            raise ProtoError("field number 0")
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            if i + 8 > len(buf):
                raise ProtoError("truncated fixed64")
            v, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ProtoError("truncated bytes")
            v, i = bytes(buf[i:i + n]), i + n
        elif wt == 5:
            if i + 4 > len(buf):
                raise ProtoError("truncated fixed32")
            v, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ProtoError("bad wire type %d" % wt)
        out.append((fn, wt, v))
    return out


def encode_fields(fields):
    out = bytearray()
    for fn, wt, v in fields:
        out += _enc_varint(fn << 3 | wt)
        if wt == 0:
            out += _enc_varint(v)
        elif wt == 1:
            out += v.to_bytes(8, "little")
        elif wt == 2:
            out += _enc_varint(len(v)) + v
        elif wt == 5:
            out += v.to_bytes(4, "little")
    return bytes(out)


def _norm_header(buf):
    # ResponseHeader: 1 cluster_id, 2 member_id, 3 revision, 4 raft_term. The values differ
    # between servers, their presence must not: etcd leaves them unset (0) in the headers
    # nested in a TxnResponse.
    return encode_fields([(fn, wt, 1 if fn in (1, 2, 4) and wt == 0 and v else v)
                          for fn, wt, v in decode_fields(buf)])


def norm_response_pb(buf, txn=False):
    """Any etcdserverpb *Response: field 1 is the header. TxnResponse: 3 = ResponseOp list,
    each holding one response (range/put/delete_range/txn in fields 1..4)."""
    fields = []
    for fn, wt, v in decode_fields(buf):
        if fn == 1 and wt == 2:
            v = _norm_header(v)
        elif txn and fn == 3 and wt == 2:
            op = []
            for ofn, owt, ov in decode_fields(v):
                if owt == 2:
                    ov = norm_response_pb(ov, txn=(ofn == 4))
                op.append((ofn, owt, ov))
            v = encode_fields(op)
        fields.append((fn, wt, v))
    return encode_fields(fields)


def norm_status_pb(buf):
    """StatusResponse: 1 header, 2 version, 3 dbSize, 4 leader, 5 raftIndex, 6 raftTerm,
    7 raftAppliedIndex, 8 errors, 9 dbSizeInUse, 10 isLearner. Keeps the header revision,
    whether the leader is the member itself, errors and isLearner."""
    fields = decode_fields(buf)
    me = None
    for fn, wt, v in fields:
        if fn == 1 and wt == 2:
            me = next((x[2] for x in decode_fields(v) if x[0] == 2), None)
    out = []
    for fn, wt, v in fields:
        if fn == 1 and wt == 2:
            v = _norm_header(v)
        elif fn == 2 and wt == 2:
            v = b"<VERSION>" if _SEMVER.match(v.decode("utf-8", "replace")) else v
        elif fn == 4 and wt == 0:
            v = 1 if v == me else 2
        elif fn in (3, 5, 6, 7, 9):
            continue
        elif fn > 10:
            continue   # fields newer than etcd 3.4's API (storageVersion, dbSizeQuota, ...)
        out.append((fn, wt, v))
    return encode_fields(out)


def dump_pb(buf, indent=""):
    """Readable text of a protobuf message for diffs (bytes fields that parse as messages
    are shown as nested messages; that is a guess, good enough to read a diff)."""
    try:
        fields = decode_fields(buf)
    except ProtoError:
        return indent + repr(buf) + "\n"
    out = []
    for fn, wt, v in fields:
        if wt == 2:
            sub = None
            if v and not (v.isascii() and v.decode().isprintable()):
                try:
                    decode_fields(v)
                    sub = dump_pb(v, indent + "  ")
                except ProtoError:
                    sub = None
            if sub is not None:
                out.append("%s%d {\n%s%s}\n" % (indent, fn, sub, indent))
            else:
                out.append("%s%d: %r\n" % (indent, fn, v))
        else:
            out.append("%s%d: %d\n" % (indent, fn, v))
    return "".join(out)


# ---------------------------------------------------------------------------------------
# text outputs

TXN_PROMPTS = [b"compares:\n", b"success requests (get, put, del):\n",
               b"failure requests (get, put, del):\n"]

_HEADER_JSON = re.compile(rb'"(cluster_id|member_id|raft_term)":(\d+)')
_HEADER_FIELDS = re.compile(rb'^"(ClusterID|MemberID|RaftTerm)" : (\d+)$', re.M)
_LOG_TS = re.compile(rb'"ts":("[^"]*"|[0-9.e+]+)')
_LOG_TARGET = re.compile(rb'"target":"endpoint://client-[0-9a-f-]+/')
_HEALTH_TOOK = re.compile(rb'(took = )\S+')
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


def _version(v):
    return "<VERSION>" if isinstance(v, str) and _SEMVER.match(v) else v


def _split_txn_prompts(out):
    """txn -i writes its prompts before the answer; keep them apart from the payload."""
    prefix = b""
    for p in TXN_PROMPTS:
        if out.startswith(prefix + p):
            prefix += p
        else:
            break
    return prefix, out[len(prefix):]


STATUS_MASKED_COLS = {"ID", "VERSION", "DB SIZE", "RAFT TERM", "RAFT INDEX",
                      "RAFT APPLIED INDEX", "TOOK"}


def _norm_table(text):
    """etcdctl -w table: column widths depend on the values, so compare cells, not borders."""
    rows = []
    header = None
    for line in text.split("\n"):
        if line.startswith("+"):
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                cells = [("<%s>" % h if h in STATUS_MASKED_COLS else c)
                         for h, c in zip(header, cells)]
            rows.append("| " + " | ".join(cells) + " |")
        else:
            rows.append(line)
    return "\n".join(rows)


def _norm_status_simple(text):
    out = []
    for line in text.split("\n"):
        cols = line.split(", ")
        if len(cols) == 10:
            # endpoint, id, version, db size, is leader, is learner, raft term, raft index,
            # raft applied index, errors
            cols[1] = "<ID>"
            cols[2] = _version(cols[2])
            cols[3] = "<DBSIZE>"
            cols[6:9] = ["<TERM>", "<INDEX>", "<APPLIED>"]
            line = ", ".join(cols)
        out.append(line)
    return "\n".join(out)


def _norm_status_json(text):
    try:
        data = json.loads(text)
    except ValueError:
        return text
    for item in data if isinstance(data, list) else []:
        st = item.get("Status") if isinstance(item, dict) else None
        if not isinstance(st, dict):
            continue
        hdr = st.get("header", {})
        me = hdr.get("member_id")
        for k in ("cluster_id", "member_id", "raft_term"):
            if k in hdr:
                hdr[k] = 0
        if "leader" in st:
            st["leader"] = "<SELF>" if st["leader"] == me else "<OTHER>"
        if "version" in st:
            st["version"] = _version(st["version"])
        for k in ("dbSize", "dbSizeInUse", "raftIndex", "raftTerm", "raftAppliedIndex"):
            if k in st:
                st[k] = "<N>"
    return json.dumps(data, separators=(",", ":")) + "\n"


def _norm_status_fields(text):
    out = []
    member = None
    for line in text.split("\n"):
        m = re.match(r'^"(\w+)" : (.*)$', line)
        if m:
            k, v = m.groups()
            if k == "MemberID":
                member = v
            if k in ("ClusterID", "MemberID", "RaftTerm", "DBSize", "DBSizeInUse", "RaftIndex",
                     "RaftAppliedIndex"):
                v = "<N>"
            elif k == "Leader":
                v = "<SELF>" if v == member else "<OTHER>"
            elif k == "Version":
                v = '"%s"' % _version(v.strip('"')) if v.startswith('"') else v
            line = '"%s" : %s' % (k, v)
        out.append(line)
    return "\n".join(out)


def _output_format(argv):
    fmt = "simple"
    for i, a in enumerate(argv):
        if a in ("-w", "--write-out") and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif a.startswith("--write-out="):
            fmt = a.split("=", 1)[1]
        elif a.startswith("-w="):
            fmt = a.split("=", 1)[1]
    return fmt


def normalize(argv, rc, out, err, endpoint):
    """Normalized (rc, stdout, stderr) of one etcdctl run; argv without --endpoints."""
    ep = endpoint.encode()
    fmt = _output_format(argv)
    words = [a for a in argv if not a.startswith("-")]
    is_status = words[:2] == ["endpoint", "status"]
    is_health = words[:2] == ["endpoint", "health"]
    is_txn = words[:1] == ["txn"]

    # stdout
    if fmt == "protobuf" and rc == 0:
        prompts, body = _split_txn_prompts(out) if is_txn else (b"", out)
        try:
            out = prompts + norm_response_pb(body, txn=is_txn)
        except ProtoError as e:
            out = prompts + b"<unparseable protobuf: %s> " % str(e).encode() + body
    else:
        out = out.replace(ep, b"<EP>")
        if is_status:
            text = out.decode("utf-8", "replace")
            if fmt == "json":
                text = _norm_status_json(text)
            elif fmt == "fields":
                text = _norm_status_fields(text)
            elif fmt == "table":
                text = _norm_table(text)
            else:
                text = _norm_status_simple(text)
            out = text.encode()
        elif is_health:
            out = re.sub(rb'"took":"[^"]*"', b'"took":"<T>"', out)
            out = re.sub(rb'^"Took" : .*$', b'"Took" : <T>', out, flags=re.M)
            if fmt == "table":
                out = _norm_table(out.decode("utf-8", "replace")).encode()
        else:
            # ids differ between servers; whether they are set (non-zero) must not
            out = _HEADER_JSON.sub(lambda m: b'"%s":%s' % (
                m.group(1), b"0" if m.group(2) == b"0" else b"<ID>"), out)
            out = _HEADER_FIELDS.sub(lambda m: b'"%s" : %s' % (
                m.group(1), b"0" if m.group(2) == b"0" else b"<ID>"), out)

    # stderr: etcdctl's client-side logs and messages
    err = err.replace(ep, b"<EP>")
    err = _LOG_TS.sub(b'"ts":"<TS>"', err)
    err = _LOG_TARGET.sub(b'"target":"endpoint://client-<ID>/', err)
    if is_health:
        err = _HEALTH_TOOK.sub(rb"\1<T>", err)
    return rc, out, err
