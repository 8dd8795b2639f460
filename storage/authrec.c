/*
 * authrec.c - the auth store's record in the environment's meta table.
 *
 * server/auth.c keeps users and roles as one record (they change rarely and are read whole
 * at start-up); the etcd data-dir import and keelsonutl's restore write the same record from
 * etcd's authUsers/authRoles buckets, so the layout lives here once:
 *   [enabled u8][revision u64][n u32]{len u32, authpb.User}[n u32]{len u32, authpb.Role}
 * integers big-endian, messages in protobuf wire format.
 */
#include <stdlib.h>
#include <string.h>

#include "storage/internal.h"

static uint8_t *put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (24 - 8 * i));
	return p + 4;
}

static uint8_t *put_list(uint8_t *p, const ProtobufCBinaryData *v, size_t n)
{
	p = put32(p, (uint32_t)n);
	for (size_t i = 0; i < n; i++) {
		p = put32(p, (uint32_t)v[i].len);
		if (v[i].len)
			memcpy(p, v[i].data, v[i].len);
		p += v[i].len;
	}
	return p;
}

int storage_batch_auth_put(storage_batch *b, int enabled, uint64_t revision, const ProtobufCBinaryData *users,
			   size_t n_users, const ProtobufCBinaryData *roles, size_t n_roles)
{
	size_t len = 1 + 8 + 4 + 4;
	for (size_t i = 0; i < n_users; i++)
		len += 4 + users[i].len;
	for (size_t i = 0; i < n_roles; i++)
		len += 4 + roles[i].len;
	uint8_t *buf = malloc(len), *p = buf;
	if (buf == NULL)
		return STORAGE_ERR_NOMEM;
	*p++ = (uint8_t)(enabled != 0);
	for (int i = 0; i < 8; i++)
		*p++ = (uint8_t)(revision >> (56 - 8 * i));
	p = put_list(p, users, n_users);
	p = put_list(p, roles, n_roles);
	int rc = storage_batch_meta_put(b, STORAGE_AUTH_META, buf, (size_t)(p - buf));
	free(buf);
	return rc;
}
