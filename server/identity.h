/*
 * identity.h - etcd's member and cluster ids, computed from --initial-cluster as etcd does
 * (membership.NewClusterFromURLsMap): the server computes them at its first start and
 * keelsonutl when it restores a snapshot into a new cluster, so both must agree.
 *   member id  = first 8 bytes (big-endian) of sha1(sorted peer URLs concatenated + token)
 *   cluster id = first 8 bytes (big-endian) of sha1(sorted member ids, 8 bytes BE each)
 */
#ifndef KEELSON_SERVER_IDENTITY_H
#define KEELSON_SERVER_IDENTITY_H

#include <stddef.h>
#include <stdint.h>

#define IDENTITY_MAX_MEMBERS 16
#define IDENTITY_MAX_URLS 8

enum {
	IDENTITY_ERR_USAGE = -1500, /* a malformed --initial-cluster (errbuf says how) */
	IDENTITY_ERR_NOMEM = -1501,
};

/* --initial-cluster parsed. The strings point into ic_buf, which the struct owns. */
typedef struct identity_cluster {
	int ic_n;
	char *ic_name[IDENTITY_MAX_MEMBERS];
	char *ic_urls[IDENTITY_MAX_MEMBERS][IDENTITY_MAX_URLS];
	int ic_n_urls[IDENTITY_MAX_MEMBERS];
	uint64_t ic_id[IDENTITY_MAX_MEMBERS];
	uint64_t ic_cluster_id;
	char *ic_buf;
} identity_cluster;

/* Parses "name=url,name=url,..." (a name may repeat for several URLs) and computes the ids.
 * On error nothing is left to free and errbuf (if not NULL) says why. */
int identity_parse(identity_cluster *c, const char *initial_cluster, const char *token,
		   char *errbuf, size_t errlen);
void identity_free(identity_cluster *c);
/* Index of name in c, or -1. */
int identity_find(const identity_cluster *c, const char *name);
/* The member id of n peer URLs (not reordered) and a token; 0 when out of memory. */
uint64_t identity_member_id(char *const *urls, int n, const char *token);
/* The cluster id of n member ids (not reordered). */
uint64_t identity_cluster_id(const uint64_t *ids, int n);

#endif
