/*
 * identity.c - member and cluster ids of a new cluster, computed from the flags exactly as
 * the member computes them at its first start (server/maint.c member_compute_all and
 * member_compute_ids, which follow etcd's membership.NewClusterFromURLsMap):
 *   member id  = first 8 bytes (big-endian) of sha1(sorted peer URLs concatenated + token)
 *   cluster id = first 8 bytes (big-endian) of sha1(sorted member ids, 8 bytes BE each)
 * A copy, not a shared helper, because tools/ may not edit server/: the two must agree, and
 * test_keelsonutl.py checks that a restored member reports the ids its flags give.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "tools/keelsonutl/keelsonutl.h"

static uint64_t be64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static int member_id(char *const *urls, int n, const char *token, uint64_t *out)
{
	char *sorted[KU_MAX_URLS];
	memcpy(sorted, urls, (size_t)n * sizeof(char *));
	qsort(sorted, (size_t)n, sizeof(char *), cmp_str);
	size_t len = strlen(token), off = 0;
	for (int i = 0; i < n; i++)
		len += strlen(sorted[i]);
	uint8_t *buf = malloc(len + 1);
	if (buf == NULL)
		return KU_ERR_NOMEM;
	for (int i = 0; i < n; i++) {
		memcpy(buf + off, sorted[i], strlen(sorted[i]));
		off += strlen(sorted[i]);
	}
	memcpy(buf + off, token, strlen(token));
	uint8_t d[SHA_DIGEST_LENGTH];
	SHA1(buf, len, d);
	free(buf);
	*out = be64(d);
	return 0;
}

int ku_cluster_parse(ku_cluster *c, const char *initial_cluster, const char *token,
		     char *errbuf, size_t errlen)
{
	memset(c, 0, sizeof(*c));
	c->kc_buf = strdup(initial_cluster);
	if (c->kc_buf == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
	char *save = NULL;
	for (char *tok = strtok_r(c->kc_buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		if (eq == NULL || eq == tok || eq[1] == '\0') {
			ku_cluster_free(c);
			return ku_errf(errbuf, errlen, KU_ERR_USAGE,
				       "--initial-cluster: %s is not name=url", tok);
		}
		*eq = '\0';
		int k = ku_cluster_find(c, tok);
		if (k < 0) {
			if (c->kc_n == KU_MAX_MEMBERS) {
				ku_cluster_free(c);
				return ku_errf(errbuf, errlen, KU_ERR_USAGE,
					       "--initial-cluster: more than %d members", KU_MAX_MEMBERS);
			}
			k = c->kc_n++;
			c->kc_name[k] = tok;
		}
		if (c->kc_n_urls[k] == KU_MAX_URLS) {
			ku_cluster_free(c);
			return ku_errf(errbuf, errlen, KU_ERR_USAGE,
				       "--initial-cluster: more than %d URLs for %s", KU_MAX_URLS, tok);
		}
		c->kc_urls[k][c->kc_n_urls[k]++] = eq + 1;
	}
	if (c->kc_n == 0) {
		ku_cluster_free(c);
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "--initial-cluster is empty");
	}
	uint64_t ids[KU_MAX_MEMBERS];
	for (int k = 0; k < c->kc_n; k++) {
		if (member_id(c->kc_urls[k], c->kc_n_urls[k], token, &c->kc_id[k]) != 0) {
			ku_cluster_free(c);
			return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
		}
		for (int j = 0; j < k; j++)
			if (c->kc_id[j] == c->kc_id[k]) {
				ku_cluster_free(c);
				return ku_errf(errbuf, errlen, KU_ERR_USAGE,
					       "--initial-cluster: members %s and %s have the same peer URLs",
					       c->kc_name[j], c->kc_name[k]);
			}
		ids[k] = c->kc_id[k];
	}
	qsort(ids, (size_t)c->kc_n, sizeof(uint64_t), cmp_u64);
	uint8_t buf[KU_MAX_MEMBERS * 8], d[SHA_DIGEST_LENGTH];
	for (int k = 0; k < c->kc_n; k++)
		for (int i = 0; i < 8; i++)
			buf[8 * k + i] = (uint8_t)(ids[k] >> (56 - 8 * i));
	SHA1(buf, (size_t)c->kc_n * 8, d);
	c->kc_cluster_id = be64(d);
	return 0;
}

void ku_cluster_free(ku_cluster *c)
{
	free(c->kc_buf);
	c->kc_buf = NULL;
}

int ku_cluster_find(const ku_cluster *c, const char *name)
{
	for (int k = 0; k < c->kc_n; k++)
		if (strcmp(c->kc_name[k], name) == 0)
			return k;
	return -1;
}
