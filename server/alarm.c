/*
 * alarm.c - etcd's cluster alarms (NOSPACE, CORRUPT) and the space quota.
 *
 * The active alarms live in memory for the checks on every write and are persisted in the
 * member's metadata by the node loop, which is the only thing that changes them: an alarm
 * is raised or cleared like any other write, so it survives restarts (and, replicated, is
 * seen by every member).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"

#define ALARM_MAX 64
#define ALARM_META "alarms"

struct alarm_set {
	pthread_mutex_t as_mu;
	size_t as_n;
	uint64_t as_member[ALARM_MAX];
	int as_type[ALARM_MAX];
	int as_nospace; /* any NOSPACE alarm active: writes that take space are refused */
	int as_corrupt;
	/* The alarms as of the last entry applied, ahead of the list above (which changes once
	 * the batch is durable): the apply path decides from these, so that every member
	 * decides the same whatever entries its batches group (node loop only). */
	size_t as_applied_n;
	uint64_t as_applied_member[ALARM_MAX];
	int as_applied_type[ALARM_MAX];
};

/* The applied view catches up with the durable list (start, reload). */
static void applied_from_durable(alarm_set *a)
{
	a->as_applied_n = a->as_n;
	memcpy(a->as_applied_member, a->as_member, sizeof(a->as_member));
	memcpy(a->as_applied_type, a->as_type, sizeof(a->as_type));
}

static int applied_has(alarm_set *a, int type)
{
	pthread_mutex_lock(&a->as_mu);
	int v = 0;
	for (size_t i = 0; i < a->as_applied_n; i++)
		v |= a->as_applied_type[i] == type;
	pthread_mutex_unlock(&a->as_mu);
	return v;
}

int alarm_applied_nospace(alarm_set *a)
{
	return applied_has(a, ETCDSERVERPB__ALARM_TYPE__NOSPACE);
}

int alarm_applied_corrupt(alarm_set *a)
{
	return applied_has(a, ETCDSERVERPB__ALARM_TYPE__CORRUPT);
}

static void recount(alarm_set *a)
{
	a->as_nospace = a->as_corrupt = 0;
	for (size_t i = 0; i < a->as_n; i++) {
		a->as_nospace |= a->as_type[i] == ETCDSERVERPB__ALARM_TYPE__NOSPACE;
		a->as_corrupt |= a->as_type[i] == ETCDSERVERPB__ALARM_TYPE__CORRUPT;
	}
}

int alarm_start(alarm_set **out, storage *st)
{
	alarm_set *a = calloc(1, sizeof(*a));
	if (a == NULL)
		return STORAGE_ERR_NOMEM;
	pthread_mutex_init(&a->as_mu, NULL);
	storage_reader *r;
	storage_arena ar;
	storage_arena_init(&ar);
	int rc = storage_read_begin(st, &r);
	if (rc == 0) {
		void *val;
		size_t len;
		rc = storage_read_meta(r, ALARM_META, &ar, &val, &len);
		if (rc == 0) {
			/* 12 bytes an alarm: member id (8, big-endian) and type (4) */
			const uint8_t *p = val;
			for (size_t off = 0; off + 12 <= len && a->as_n < ALARM_MAX; off += 12) {
				uint64_t m = 0;
				uint32_t t = 0;
				for (int i = 0; i < 8; i++)
					m = m << 8 | p[off + i];
				for (int i = 8; i < 12; i++)
					t = t << 8 | p[off + i];
				a->as_member[a->as_n] = m;
				a->as_type[a->as_n++] = (int)t;
			}
		} else if (rc == STORAGE_ERR_NOT_FOUND) {
			rc = 0;
		}
		storage_read_end(r);
	}
	storage_arena_free(&ar);
	if (rc) {
		alarm_free(a);
		return rc;
	}
	recount(a);
	applied_from_durable(a);
	*out = a;
	return 0;
}

void alarm_free(alarm_set *a)
{
	if (a == NULL)
		return;
	pthread_mutex_destroy(&a->as_mu);
	free(a);
}

int alarm_reload(alarm_set *a, storage *st)
{
	alarm_set *fresh;
	int rc = alarm_start(&fresh, st);
	if (rc)
		return rc;
	pthread_mutex_lock(&a->as_mu);
	a->as_n = fresh->as_n;
	memcpy(a->as_member, fresh->as_member, sizeof(a->as_member));
	memcpy(a->as_type, fresh->as_type, sizeof(a->as_type));
	recount(a);
	applied_from_durable(a);
	pthread_mutex_unlock(&a->as_mu);
	alarm_free(fresh);
	return 0;
}

int alarm_nospace(alarm_set *a)
{
	pthread_mutex_lock(&a->as_mu);
	int v = a->as_nospace;
	pthread_mutex_unlock(&a->as_mu);
	return v;
}

int alarm_corrupt(alarm_set *a)
{
	pthread_mutex_lock(&a->as_mu);
	int v = a->as_corrupt;
	pthread_mutex_unlock(&a->as_mu);
	return v;
}

/* etcd's AlarmStore.Get: every alarm of the type, or all for NONE. Fills resp from arena. */
static int alarm_list(alarm_set *a, int type, storage_arena *ar, Etcdserverpb__AlarmResponse *resp)
{
	pthread_mutex_lock(&a->as_mu);
	Etcdserverpb__AlarmMember **out = storage_arena_alloc(ar, (a->as_n + 1) * sizeof(*out));
	size_t n = 0;
	for (size_t i = 0; out && i < a->as_n; i++) {
		if (type != ETCDSERVERPB__ALARM_TYPE__NONE && a->as_type[i] != type)
			continue;
		Etcdserverpb__AlarmMember *m = storage_arena_alloc(ar, sizeof(*m));
		if (m == NULL) {
			out = NULL;
			break;
		}
		etcdserverpb__alarm_member__init(m);
		m->memberid = a->as_member[i];
		m->alarm = (Etcdserverpb__AlarmType)a->as_type[i];
		out[n++] = m;
	}
	pthread_mutex_unlock(&a->as_mu);
	resp->alarms = out;
	resp->n_alarms = n;
	return out ? 0 : STORAGE_ERR_NOMEM;
}

/*
 * The node loop applies an ACTIVATE or DEACTIVATE: writes the new list into the batch and
 * reports in resp the alarm that changed (none if nothing did, as etcd). The in-memory set
 * changes only in alarm_commit(), once the batch is durable.
 */
int alarm_apply(alarm_set *a, storage_batch *b, const Etcdserverpb__AlarmRequest *req,
		storage_arena *ar, Etcdserverpb__AlarmResponse *resp, alarm_change *chg)
{
	memset(chg, 0, sizeof(*chg));
	if (req->action == ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__GET)
		return alarm_list(a, req->alarm, ar, resp);
	if (req->alarm == ETCDSERVERPB__ALARM_TYPE__NONE)
		return 0;
	int activate = req->action == ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__ACTIVATE;
	uint64_t member[ALARM_MAX];
	int type[ALARM_MAX];
	size_t n = 0;
	int found = 0;
	pthread_mutex_lock(&a->as_mu);
	for (size_t i = 0; i < a->as_applied_n; i++) {
		int same = a->as_applied_member[i] == req->memberid && a->as_applied_type[i] == (int)req->alarm;
		found |= same;
		if (same && !activate)
			continue;
		member[n] = a->as_applied_member[i];
		type[n++] = a->as_applied_type[i];
	}
	pthread_mutex_unlock(&a->as_mu);
	if (activate == found) /* already active, or not there to clear */
		return 0;
	if (activate) {
		if (n == ALARM_MAX)
			return STORAGE_ERR_NOSPACE;
		member[n] = req->memberid;
		type[n++] = (int)req->alarm;
	}
	uint8_t buf[ALARM_MAX * 12];
	for (size_t i = 0; i < n; i++) {
		for (int k = 0; k < 8; k++)
			buf[i * 12 + k] = (uint8_t)(member[i] >> (56 - 8 * k));
		for (int k = 0; k < 4; k++)
			buf[i * 12 + 8 + k] = (uint8_t)((uint32_t)type[i] >> (24 - 8 * k));
	}
	int rc = storage_batch_meta_put(b, ALARM_META, buf, n * 12);
	if (rc)
		return rc;
	/* The next entries of this batch see the change (a failed batch stops the member). */
	pthread_mutex_lock(&a->as_mu);
	a->as_applied_n = n;
	memcpy(a->as_applied_member, member, n * sizeof(member[0]));
	memcpy(a->as_applied_type, type, n * sizeof(type[0]));
	pthread_mutex_unlock(&a->as_mu);
	Etcdserverpb__AlarmMember *m = storage_arena_alloc(ar, sizeof(*m));
	Etcdserverpb__AlarmMember **list = storage_arena_alloc(ar, sizeof(*list));
	if (m == NULL || list == NULL)
		return STORAGE_ERR_NOMEM;
	etcdserverpb__alarm_member__init(m);
	m->memberid = req->memberid;
	m->alarm = req->alarm;
	list[0] = m;
	resp->alarms = list;
	resp->n_alarms = 1;
	chg->ac_changed = 1;
	chg->ac_activate = activate;
	chg->ac_member = req->memberid;
	chg->ac_type = (int)req->alarm;
	return 0;
}

void alarm_commit(alarm_set *a, const alarm_change *chg)
{
	if (!chg->ac_changed)
		return;
	pthread_mutex_lock(&a->as_mu);
	if (chg->ac_activate) {
		if (a->as_n < ALARM_MAX) {
			a->as_member[a->as_n] = chg->ac_member;
			a->as_type[a->as_n++] = chg->ac_type;
		}
	} else {
		for (size_t i = 0; i < a->as_n; i++) {
			if (a->as_member[i] == chg->ac_member && a->as_type[i] == chg->ac_type) {
				memmove(&a->as_member[i], &a->as_member[i + 1], (a->as_n - i - 1) * sizeof(uint64_t));
				memmove(&a->as_type[i], &a->as_type[i + 1], (a->as_n - i - 1) * sizeof(int));
				a->as_n--;
				break;
			}
		}
	}
	recount(a);
	pthread_mutex_unlock(&a->as_mu);
	log_at(chg->ac_activate ? LOG_WARN : LOG_INFO, chg->ac_activate ? "alarm raised" : "alarm cleared",
	       "alarm", chg->ac_type == ETCDSERVERPB__ALARM_TYPE__NOSPACE ? "NOSPACE" : "CORRUPT", NULL);
}

/* etcd's Status errors: the alarms in protobuf text form, "memberID:N alarm:NOSPACE ". */
size_t alarm_status_errors(alarm_set *a, char **out, size_t max, char buf[][64])
{
	size_t n = 0;
	pthread_mutex_lock(&a->as_mu);
	for (size_t i = 0; i < a->as_n && n < max; i++) {
		snprintf(buf[n], 64, "memberID:%llu alarm:%s ", (unsigned long long)a->as_member[i],
			 a->as_type[i] == ETCDSERVERPB__ALARM_TYPE__NOSPACE ? "NOSPACE" : "CORRUPT");
		out[n] = buf[n];
		n++;
	}
	pthread_mutex_unlock(&a->as_mu);
	return n;
}

/*
 * etcd's quota: a write that would take the backend past --quota-backend-bytes is refused
 * and raises NOSPACE for this member. Returns 1 if the write must be refused.
 */
int alarm_quota_exceeded(server_ctx *sc, size_t request_bytes)
{
	if (alarm_nospace(sc->alarms))
		return 1;
	/* etcd's costs: the request plus a fixed overhead per key for the index and meta. */
	uint64_t cost = request_bytes + 64 + 256;
	if (storage_quota_size(sc->st) + cost < sc->quota_bytes)
		return 0;
	Etcdserverpb__AlarmRequest *req = malloc(sizeof(*req));
	if (req != NULL) {
		etcdserverpb__alarm_request__init(req);
		req->action = ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__ACTIVATE;
		req->memberid = sc->mi.member_id;
		req->alarm = ETCDSERVERPB__ALARM_TYPE__NOSPACE;
		node_submit(sc->nd, NODE_ALARM, NULL, &req->base);
	}
	return 1;
}

/* ---- Maintenance.Alarm ---- */

/* etcd 3.4 checks neither the learner rule nor auth here: any client may list and disarm. */
static void maint_alarm(void *ctx, api_call *call, const ProtobufCMessage *msg)
{
	server_ctx *sc = ctx;
	const Etcdserverpb__AlarmRequest *req = (const Etcdserverpb__AlarmRequest *)msg;
	if (req->action != ETCDSERVERPB__ALARM_REQUEST__ALARM_ACTION__GET) {
		node_submit(sc->nd, NODE_ALARM, call, msg);
		return;
	}
	storage_arena ar;
	storage_arena_init(&ar);
	Etcdserverpb__AlarmResponse resp = ETCDSERVERPB__ALARM_RESPONSE__INIT;
	Etcdserverpb__ResponseHeader h = ETCDSERVERPB__RESPONSE_HEADER__INIT;
	server_fill_header(sc, &h);
	h.revision = storage_current_revision(sc->st);
	resp.header = &h;
	int rc = alarm_list(sc->alarms, req->alarm, &ar, &resp);
	if (rc)
		server_fail_storage(call, rc);
	else
		api_call_reply(call, &resp.base);
	storage_arena_free(&ar);
}

int alarm_register(api_server *as, server_ctx *sc)
{
	return api_server_route(as, "/etcdserverpb.Maintenance/Alarm", maint_alarm, sc);
}

size_t alarm_export(storage_reader *r, storage_arena *ar, storage_etcd_entry *out, size_t max)
{
	void *val;
	size_t len, n = 0;
	if (storage_read_meta(r, ALARM_META, ar, &val, &len) != 0)
		return 0;
	const uint8_t *p = val;
	for (size_t off = 0; off + 12 <= len && n < max; off += 12) {
		Etcdserverpb__AlarmMember am = ETCDSERVERPB__ALARM_MEMBER__INIT;
		for (int i = 0; i < 8; i++)
			am.memberid = am.memberid << 8 | p[off + i];
		uint32_t t = 0;
		for (int i = 8; i < 12; i++)
			t = t << 8 | p[off + i];
		am.alarm = (Etcdserverpb__AlarmType)t;
		/* etcd's alarm bucket: the encoded AlarmMember is the key, the value is empty. */
		size_t klen = etcdserverpb__alarm_member__get_packed_size(&am);
		uint8_t *key = storage_arena_alloc(ar, klen ? klen : 1);
		if (key == NULL)
			break;
		etcdserverpb__alarm_member__pack(&am, key);
		out[n++] = (storage_etcd_entry){"alarm", key, klen, "", 0};
	}
	return n;
}
