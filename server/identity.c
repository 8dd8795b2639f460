/*
 * identity.c - etcd's member and cluster ids (see identity.h).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>

#include "server/identity.h"

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

uint64_t identity_member_id(char *const *urls, int n, const char *token)
{
	char *sorted[IDENTITY_MAX_URLS];
	if (n > IDENTITY_MAX_URLS)
		n = IDENTITY_MAX_URLS;
	memcpy(sorted, urls, (size_t)n * sizeof(char *));
	qsort(sorted, (size_t)n, sizeof(char *), cmp_str);
	size_t len = strlen(token), off = 0;
	for (int i = 0; i < n; i++)
		len += strlen(sorted[i]);
	uint8_t *buf = malloc(len + 1);
	if (buf == NULL)
		return 0;
	for (int i = 0; i < n; i++) {
		memcpy(buf + off, sorted[i], strlen(sorted[i]));
		off += strlen(sorted[i]);
	}
	memcpy(buf + off, token, strlen(token));
	uint8_t d[SHA_DIGEST_LENGTH];
	SHA1(buf, len, d);
	free(buf);
	return be64(d);
}

uint64_t identity_cluster_id(const uint64_t *ids, int n)
{
	uint64_t sorted[IDENTITY_MAX_MEMBERS + 1];
	if (n > IDENTITY_MAX_MEMBERS + 1)
		n = IDENTITY_MAX_MEMBERS + 1;
	memcpy(sorted, ids, (size_t)n * sizeof(uint64_t));
	qsort(sorted, (size_t)n, sizeof(uint64_t), cmp_u64);
	uint8_t buf[(IDENTITY_MAX_MEMBERS + 1) * 8], d[SHA_DIGEST_LENGTH];
	for (int k = 0; k < n; k++)
		for (int i = 0; i < 8; i++)
			buf[8 * k + i] = (uint8_t)(sorted[k] >> (56 - 8 * i));
	SHA1(buf, (size_t)n * 8, d);
	return be64(d);
}

static int fail(identity_cluster *c, char *errbuf, size_t errlen, int err, const char *fmt, ...)
{
	identity_free(c);
	if (errbuf && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(errbuf, errlen, fmt, ap);
		va_end(ap);
	}
	return err;
}

int identity_parse(identity_cluster *c, const char *initial_cluster, const char *token,
		   char *errbuf, size_t errlen)
{
	memset(c, 0, sizeof(*c));
	c->ic_buf = strdup(initial_cluster);
	if (c->ic_buf == NULL)
		return fail(c, errbuf, errlen, IDENTITY_ERR_NOMEM, "out of memory");
	char *save = NULL;
	for (char *tok = strtok_r(c->ic_buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		if (eq == NULL || eq == tok || eq[1] == '\0')
			return fail(c, errbuf, errlen, IDENTITY_ERR_USAGE, "--initial-cluster: %s is not name=url", tok);
		*eq = '\0';
		int k = identity_find(c, tok);
		if (k < 0) {
			if (c->ic_n == IDENTITY_MAX_MEMBERS)
				return fail(c, errbuf, errlen, IDENTITY_ERR_USAGE,
					    "--initial-cluster: more than %d members", IDENTITY_MAX_MEMBERS);
			k = c->ic_n++;
			c->ic_name[k] = tok;
		}
		if (c->ic_n_urls[k] == IDENTITY_MAX_URLS)
			return fail(c, errbuf, errlen, IDENTITY_ERR_USAGE,
				    "--initial-cluster: more than %d URLs for %s", IDENTITY_MAX_URLS, tok);
		c->ic_urls[k][c->ic_n_urls[k]++] = eq + 1;
	}
	if (c->ic_n == 0)
		return fail(c, errbuf, errlen, IDENTITY_ERR_USAGE, "--initial-cluster is empty");
	for (int k = 0; k < c->ic_n; k++) {
		c->ic_id[k] = identity_member_id(c->ic_urls[k], c->ic_n_urls[k], token);
		if (c->ic_id[k] == 0)
			return fail(c, errbuf, errlen, IDENTITY_ERR_NOMEM, "out of memory");
		for (int j = 0; j < k; j++)
			if (c->ic_id[j] == c->ic_id[k])
				return fail(c, errbuf, errlen, IDENTITY_ERR_USAGE,
					    "--initial-cluster: members %s and %s have the same peer URLs",
					    c->ic_name[j], c->ic_name[k]);
	}
	c->ic_cluster_id = identity_cluster_id(c->ic_id, c->ic_n);
	return 0;
}

void identity_free(identity_cluster *c)
{
	free(c->ic_buf);
	c->ic_buf = NULL;
}

int identity_find(const identity_cluster *c, const char *name)
{
	for (int k = 0; k < c->ic_n; k++)
		if (strcmp(c->ic_name[k], name) == 0)
			return k;
	return -1;
}
