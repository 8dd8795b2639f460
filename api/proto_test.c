/* Round-trip and byte-exact encoding checks for the etcd-compatible protos. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/proto/kv.pb-c.h"
#include "api/proto/auth.pb-c.h"
#include "api/proto/rpc.pb-c.h"
#include "tests/unit/check.h"


#define BYTES(s) ((ProtobufCBinaryData){sizeof(s) - 1, (uint8_t *)(s)})

static int bin_eq(ProtobufCBinaryData b, const char *s) {
  return b.len == strlen(s) && memcmp(b.data, s, b.len) == 0;
}

static void check_bytes(const char *what, const uint8_t *got, size_t got_len,
                        const uint8_t *want, size_t want_len) {
  if (got_len == want_len && memcmp(got, want, got_len) == 0) return;
  fprintf(stderr, "%s: encoding mismatch\n  got :", what);
  for (size_t i = 0; i < got_len; i++) fprintf(stderr, " %02x", got[i]);
  fprintf(stderr, "\n  want:");
  for (size_t i = 0; i < want_len; i++) fprintf(stderr, " %02x", want[i]);
  fprintf(stderr, "\n");
  check_failures++;
}

#define PACK(desc_prefix, msg, bufvar, lenvar)                  \
  size_t lenvar = desc_prefix##__get_packed_size(msg);          \
  uint8_t *bufvar = malloc(lenvar ? lenvar : 1);                \
  CHECK(desc_prefix##__pack(msg, bufvar) == lenvar)

static void test_put_request(void) {
  Etcdserverpb__PutRequest put = ETCDSERVERPB__PUT_REQUEST__INIT;
  put.key = BYTES("foo");
  put.value = BYTES("bar");
  put.lease = 1;
  put.prev_kv = 1;
  PACK(etcdserverpb__put_request, &put, buf, len);
  /* key=1 (LEN), value=2 (LEN), lease=3 (VARINT), prev_kv=4 (VARINT) */
  static const uint8_t want[] = {0x0a, 0x03, 'f', 'o', 'o', 0x12, 0x03, 'b',
                                 'a',  'r',  0x18, 0x01, 0x20, 0x01};
  check_bytes("PutRequest", buf, len, want, sizeof want);

  Etcdserverpb__PutRequest *out =
      etcdserverpb__put_request__unpack(NULL, len, buf);
  CHECK(out != NULL);
  if (out) {
    CHECK(bin_eq(out->key, "foo"));
    CHECK(bin_eq(out->value, "bar"));
    CHECK(out->lease == 1);
    CHECK(out->prev_kv == 1);
    CHECK(out->ignore_value == 0 && out->ignore_lease == 0);
    etcdserverpb__put_request__free_unpacked(out, NULL);
  }
  free(buf);
}

static void test_key_value(void) {
  Mvccpb__KeyValue kv = MVCCPB__KEY_VALUE__INIT;
  kv.key = BYTES("a");
  kv.create_revision = 2;
  kv.mod_revision = 3;
  kv.version = 1;
  kv.value = BYTES("b");
  kv.lease = 0x10;
  PACK(mvccpb__key_value, &kv, buf, len);
  static const uint8_t want[] = {0x0a, 0x01, 'a',  0x10, 0x02, 0x18, 0x03,
                                 0x20, 0x01, 0x2a, 0x01, 'b',  0x30, 0x10};
  check_bytes("KeyValue", buf, len, want, sizeof want);

  Mvccpb__KeyValue *out = mvccpb__key_value__unpack(NULL, len, buf);
  CHECK(out != NULL);
  if (out) {
    CHECK(bin_eq(out->key, "a") && bin_eq(out->value, "b"));
    CHECK(out->create_revision == 2 && out->mod_revision == 3);
    CHECK(out->version == 1 && out->lease == 0x10);
    mvccpb__key_value__free_unpacked(out, NULL);
  }
  free(buf);

  /* Event wraps KeyValue at field 2; DELETE=1 at field 1. */
  Mvccpb__KeyValue small = MVCCPB__KEY_VALUE__INIT;
  small.key = BYTES("a");
  Mvccpb__Event ev = MVCCPB__EVENT__INIT;
  ev.type = MVCCPB__EVENT__EVENT_TYPE__DELETE;
  ev.kv = &small;
  PACK(mvccpb__event, &ev, ebuf, elen);
  static const uint8_t ewant[] = {0x08, 0x01, 0x12, 0x03, 0x0a, 0x01, 'a'};
  check_bytes("Event", ebuf, elen, ewant, sizeof ewant);
  free(ebuf);
}

static void test_txn(void) {
  Etcdserverpb__Compare cmp = ETCDSERVERPB__COMPARE__INIT;
  cmp.result = ETCDSERVERPB__COMPARE__COMPARE_RESULT__EQUAL; /* 0: omitted */
  cmp.target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE; /* 3 */
  cmp.key = BYTES("k");
  cmp.target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VALUE;
  cmp.value = BYTES("v");
  cmp.range_end = BYTES("z"); /* field 64 -> tag varint 0x82 0x04 */
  Etcdserverpb__Compare *cmps[] = {&cmp};

  Etcdserverpb__PutRequest put = ETCDSERVERPB__PUT_REQUEST__INIT;
  put.key = BYTES("k");
  put.value = BYTES("v");
  Etcdserverpb__RequestOp op = ETCDSERVERPB__REQUEST_OP__INIT;
  op.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
  op.request_put = &put;
  Etcdserverpb__RequestOp *ops[] = {&op};

  Etcdserverpb__RangeRequest rr = ETCDSERVERPB__RANGE_REQUEST__INIT;
  rr.key = BYTES("k");
  rr.limit = 1;
  Etcdserverpb__RequestOp fop = ETCDSERVERPB__REQUEST_OP__INIT;
  fop.request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
  fop.request_range = &rr;
  Etcdserverpb__RequestOp *fops[] = {&fop};

  Etcdserverpb__TxnRequest txn = ETCDSERVERPB__TXN_REQUEST__INIT;
  txn.n_compare = 1;
  txn.compare = cmps;
  txn.n_success = 1;
  txn.success = ops;
  txn.n_failure = 1;
  txn.failure = fops;
  PACK(etcdserverpb__txn_request, &txn, buf, len);
  static const uint8_t want[] = {
      /* compare (1): target=VALUE, key="k", value(7)="v", range_end(64)="z" */
      0x0a, 0x0c, 0x10, 0x03, 0x1a, 0x01, 'k', 0x3a, 0x01, 'v', 0x82, 0x04,
      0x01, 'z',
      /* success (2): RequestOp{request_put(2): {key "k", value "v"}} */
      0x12, 0x08, 0x12, 0x06, 0x0a, 0x01, 'k', 0x12, 0x01, 'v',
      /* failure (3): RequestOp{request_range(1): {key "k", limit 1}} */
      0x1a, 0x07, 0x0a, 0x05, 0x0a, 0x01, 'k', 0x18, 0x01};
  check_bytes("TxnRequest", buf, len, want, sizeof want);

  Etcdserverpb__TxnRequest *out =
      etcdserverpb__txn_request__unpack(NULL, len, buf);
  CHECK(out != NULL);
  if (out) {
    CHECK(out->n_compare == 1 && out->n_success == 1 && out->n_failure == 1);
    if (out->n_compare == 1) {
      Etcdserverpb__Compare *c = out->compare[0];
      CHECK(c->target == ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE);
      CHECK(c->target_union_case == ETCDSERVERPB__COMPARE__TARGET_UNION_VALUE);
      CHECK(bin_eq(c->value, "v") && bin_eq(c->range_end, "z"));
    }
    if (out->n_success == 1) {
      Etcdserverpb__RequestOp *o = out->success[0];
      CHECK(o->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT);
      if (o->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT)
        CHECK(bin_eq(o->request_put->key, "k") &&
              bin_eq(o->request_put->value, "v"));
    }
    if (out->n_failure == 1) {
      Etcdserverpb__RequestOp *o = out->failure[0];
      CHECK(o->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE);
      if (o->request_case == ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE)
        CHECK(o->request_range->limit == 1);
    }
    etcdserverpb__txn_request__free_unpacked(out, NULL);
  }
  free(buf);
}

static void test_watch_create(void) {
  /* proto3 packed repeated enum (filters=5), watch_id=7, fragment=8 */
  Etcdserverpb__WatchCreateRequest cr = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
  cr.key = BYTES("w");
  Etcdserverpb__WatchCreateRequest__FilterType f[] = {
      ETCDSERVERPB__WATCH_CREATE_REQUEST__FILTER_TYPE__NODELETE};
  cr.n_filters = 1;
  cr.filters = f;
  cr.prev_kv = 1;
  cr.watch_id = 9;
  cr.fragment = 1;
  Etcdserverpb__WatchRequest wr = ETCDSERVERPB__WATCH_REQUEST__INIT;
  wr.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
  wr.create_request = &cr;
  PACK(etcdserverpb__watch_request, &wr, buf, len);
  static const uint8_t want[] = {0x0a, 0x0c, 0x0a, 0x01, 'w',  0x2a, 0x01,
                                 0x01, 0x30, 0x01, 0x38, 0x09, 0x40, 0x01};
  check_bytes("WatchRequest", buf, len, want, sizeof want);
  free(buf);

  /* progress_request (3) is an empty submessage */
  Etcdserverpb__WatchProgressRequest pr = ETCDSERVERPB__WATCH_PROGRESS_REQUEST__INIT;
  Etcdserverpb__WatchRequest wp = ETCDSERVERPB__WATCH_REQUEST__INIT;
  wp.request_union_case =
      ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_PROGRESS_REQUEST;
  wp.progress_request = &pr;
  PACK(etcdserverpb__watch_request, &wp, pbuf, plen);
  static const uint8_t pwant[] = {0x1a, 0x00};
  check_bytes("WatchRequest(progress)", pbuf, plen, pwant, sizeof pwant);
  free(pbuf);
}

static void test_misc_encodings(void) {
  /* Upper-case etcd field names (TTL, ID) keep their numbers. */
  Etcdserverpb__LeaseGrantRequest lg = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
  lg.ttl = 5;
  lg.id = 7;
  PACK(etcdserverpb__lease_grant_request, &lg, buf, len);
  static const uint8_t want[] = {0x08, 0x05, 0x10, 0x07};
  check_bytes("LeaseGrantRequest", buf, len, want, sizeof want);
  free(buf);

  /* StatusResponse late fields: isLearner=10, dbSizeQuota=12, downgradeInfo=13 */
  Etcdserverpb__DowngradeInfo di = ETCDSERVERPB__DOWNGRADE_INFO__INIT;
  di.enabled = 1;
  Etcdserverpb__StatusResponse st = ETCDSERVERPB__STATUS_RESPONSE__INIT;
  st.islearner = 1;
  st.dbsizequota = 2;
  st.downgradeinfo = &di;
  PACK(etcdserverpb__status_response, &st, sbuf, slen);
  static const uint8_t swant[] = {0x50, 0x01, 0x60, 0x02, 0x6a, 0x02, 0x08, 0x01};
  check_bytes("StatusResponse", sbuf, slen, swant, sizeof swant);
  free(sbuf);

  /* RangeStreamResponse wraps RangeResponse at field 1; header=1, count=4 */
  Etcdserverpb__ResponseHeader hdr = ETCDSERVERPB__RESPONSE_HEADER__INIT;
  hdr.revision = 3;
  Etcdserverpb__RangeResponse rr = ETCDSERVERPB__RANGE_RESPONSE__INIT;
  rr.header = &hdr;
  rr.count = 2;
  Etcdserverpb__RangeStreamResponse rs = ETCDSERVERPB__RANGE_STREAM_RESPONSE__INIT;
  rs.range_response = &rr;
  PACK(etcdserverpb__range_stream_response, &rs, rbuf, rlen);
  static const uint8_t rwant[] = {0x0a, 0x06, 0x0a, 0x02, 0x18, 0x03, 0x20, 0x02};
  check_bytes("RangeStreamResponse", rbuf, rlen, rwant, sizeof rwant);
  free(rbuf);

  /* WatchResponse.events is field 11 */
  Mvccpb__Event ev = MVCCPB__EVENT__INIT;
  Mvccpb__Event *evs[] = {&ev};
  Etcdserverpb__WatchResponse wresp = ETCDSERVERPB__WATCH_RESPONSE__INIT;
  wresp.n_events = 1;
  wresp.events = evs;
  PACK(etcdserverpb__watch_response, &wresp, wbuf, wlen);
  static const uint8_t wwant[] = {0x5a, 0x00};
  check_bytes("WatchResponse", wbuf, wlen, wwant, sizeof wwant);
  free(wbuf);

  /* authpb.Permission: permType=1, key=2 */
  Authpb__Permission perm = AUTHPB__PERMISSION__INIT;
  perm.permtype = AUTHPB__PERMISSION__TYPE__READWRITE;
  perm.key = BYTES("p");
  PACK(authpb__permission, &perm, abuf, alen);
  static const uint8_t awant[] = {0x08, 0x02, 0x12, 0x01, 'p'};
  check_bytes("Permission", abuf, alen, awant, sizeof awant);
  free(abuf);
}

static void check_path(const ProtobufCServiceDescriptor *svc, unsigned idx,
                       const char *want) {
  char path[256];
  CHECK(idx < svc->n_methods);
  if (idx >= svc->n_methods) return;
  snprintf(path, sizeof path, "/%s/%s", svc->name, svc->methods[idx].name);
  if (strcmp(path, want) != 0) {
    fprintf(stderr, "method path: got %s want %s\n", path, want);
    check_failures++;
  }
}

static void test_service_paths(void) {
  check_path(&etcdserverpb__kv__descriptor, 0, "/etcdserverpb.KV/Range");
  check_path(&etcdserverpb__kv__descriptor, 3, "/etcdserverpb.KV/Txn");
  check_path(&etcdserverpb__kv__descriptor, 5, "/etcdserverpb.KV/RangeStream");
  check_path(&etcdserverpb__watch__descriptor, 0, "/etcdserverpb.Watch/Watch");
  check_path(&etcdserverpb__lease__descriptor, 2,
             "/etcdserverpb.Lease/LeaseKeepAlive");
  check_path(&etcdserverpb__cluster__descriptor, 4,
             "/etcdserverpb.Cluster/MemberPromote");
  check_path(&etcdserverpb__maintenance__descriptor, 7,
             "/etcdserverpb.Maintenance/Downgrade");
  check_path(&etcdserverpb__auth__descriptor, 16,
             "/etcdserverpb.Auth/RoleRevokePermission");
  CHECK(etcdserverpb__kv__descriptor.n_methods == 6);
  CHECK(etcdserverpb__watch__descriptor.n_methods == 1);
  CHECK(etcdserverpb__lease__descriptor.n_methods == 5);
  CHECK(etcdserverpb__cluster__descriptor.n_methods == 5);
  CHECK(etcdserverpb__maintenance__descriptor.n_methods == 8);
  CHECK(etcdserverpb__auth__descriptor.n_methods == 17);
  CHECK(protobuf_c_service_descriptor_get_method_by_name(
            &etcdserverpb__kv__descriptor, "Put") != NULL);
}

int main(void) {
  test_put_request();
  test_key_value();
  test_txn();
  test_watch_create();
  test_misc_encodings();
  test_service_paths();
  if (check_failures) {
    fprintf(stderr, "proto_test: %d failure(s)\n", check_failures);
    return 1;
  }
  printf("proto_test: OK\n");
  return 0;
}
