/*
 * main.c - keelsonutl's command line: dispatch, etcd-style flags, `snapshot save`.
 *
 * Exit status: 0 success, 1 failure (the message on stderr starts with "Error: " as
 * etcdctl's do), 2 usage.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "backup/backup.h"
#include "tools/keelsonutl/keelsonutl.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: keelsonutl snapshot save FILE [--endpoints=127.0.0.1:2379[,...]] [--dial-timeout=2s]\n"
		"                  [--command-timeout=0s] [--cacert=CA] [--cert=CERT --key=KEY]\n"
		"                  [--user=NAME[:PASSWORD]] [--password=PASSWORD] [--compress]\n"
		"       keelsonutl snapshot status FILE [-w simple|table|json|fields] [--skip-hash-check]\n"
		"       keelsonutl snapshot restore FILE [--data-dir=NAME.etcd] [--name=default]\n"
		"                  [--initial-cluster=default=http://localhost:2380]\n"
		"                  [--initial-cluster-token=etcd-cluster]\n"
		"                  [--initial-advertise-peer-urls=http://localhost:2380]\n"
		"                  [--skip-hash-check] [--bump-revision=N --mark-compacted]\n"
		"       keelsonutl backup --dir=DIR [--interval=1h | --schedule='CRON' [--utc]]\n"
		"                  [--retain=N] [--max-age=DURATION] [--thin] [--compress] [--verify]\n"
		"                  [--metrics-file=PATH] [--listen-metrics=HOST:PORT] [--once]\n"
		"                  [connection flags as for snapshot save]\n"
		"  status and restore read gzip-compressed snapshots (--compress) as they read plain ones.\n");
}

int ku_errf(char *errbuf, size_t errlen, int code, const char *fmt, ...)
{
	if (errbuf && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(errbuf, errlen, fmt, ap);
		va_end(ap);
	}
	return code;
}

int ku_flags_parse(int argc, char **argv, const ku_flag *flags, char **pos, int maxpos,
		   int *npos, char *errbuf, size_t errlen)
{
	*npos = 0;
	for (int i = 0; i < argc; i++) {
		char *a = argv[i];
		if (a[0] != '-' || a[1] == '\0') {
			if (*npos >= maxpos)
				return ku_errf(errbuf, errlen, KU_ERR_USAGE, "unexpected argument %s", a);
			pos[(*npos)++] = a;
			continue;
		}
		const char *name = a + 1 + (a[1] == '-');
		const char *eq = strchr(name, '=');
		size_t nl = eq ? (size_t)(eq - name) : strlen(name);
		const ku_flag *f = NULL;
		for (const ku_flag *g = flags; g->kf_name; g++)
			if (strlen(g->kf_name) == nl && strncmp(g->kf_name, name, nl) == 0)
				f = g;
		if (f == NULL)
			return ku_errf(errbuf, errlen, KU_ERR_USAGE, "unknown flag: %.*s", (int)(nl + (name - a)),
				       a);
		if (f->kf_kind == KU_FLAG_BOOL) {
			if (eq == NULL || strcmp(eq + 1, "true") == 0)
				*f->kf_bool = 1;
			else if (strcmp(eq + 1, "false") == 0)
				*f->kf_bool = 0;
			else
				return ku_errf(errbuf, errlen, KU_ERR_USAGE, "invalid value for --%s: %s",
					       f->kf_name, eq + 1);
			continue;
		}
		if (eq) {
			*f->kf_str = eq + 1;
		} else if (i + 1 < argc) {
			*f->kf_str = argv[++i];
		} else {
			return ku_errf(errbuf, errlen, KU_ERR_USAGE, "flag needs an argument: --%s",
				       f->kf_name);
		}
	}
	return 0;
}

int ku_parse_endpoints(ku_conn_opts *o, char *s, char *errbuf, size_t errlen)
{
	o->co_n_endpoints = 0;
	char *save = NULL;
	for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		if (*t == '\0')
			continue;
		if (o->co_n_endpoints == KU_MAX_ENDPOINTS)
			return ku_errf(errbuf, errlen, KU_ERR_USAGE, "too many endpoints (at most %d)",
				       KU_MAX_ENDPOINTS);
		o->co_endpoints[o->co_n_endpoints++] = t;
	}
	if (o->co_n_endpoints == 0)
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "no endpoints given");
	return 0;
}

int ku_conn_opts_from_flags(ku_conn_opts *o, const ku_conn_flags *f, char **buf,
			    char *errbuf, size_t errlen)
{
	memset(o, 0, sizeof(*o));
	*buf = strdup(f->endpoints ? f->endpoints : "127.0.0.1:2379");
	if (*buf == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
	int rc = ku_parse_endpoints(o, *buf, errbuf, errlen);
	if (rc)
		return rc;
	o->co_dial_timeout = 2;
	if (f->dial_timeout && (backup_parse_duration(f->dial_timeout, &o->co_dial_timeout) ||
				o->co_dial_timeout <= 0))
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "invalid --dial-timeout: %s", f->dial_timeout);
	if (f->command_timeout && backup_parse_duration(f->command_timeout, &o->co_command_timeout))
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "invalid --command-timeout: %s",
			       f->command_timeout);
	o->co_cacert = f->cacert;
	o->co_cert = f->cert;
	o->co_key = f->key;
	o->co_user = f->user;
	o->co_password = f->password;
	if ((o->co_cert == NULL) != (o->co_key == NULL))
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "--cert and --key must be given together");
	if (o->co_password && o->co_user == NULL)
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "--password needs --user");
	if (o->co_user && o->co_password == NULL) {
		/* etcdctl's --user name:password (the first colon splits them) */
		char *colon = strchr(f->user, ':');
		if (colon == NULL)
			return ku_errf(errbuf, errlen, KU_ERR_USAGE,
				       "--user needs a password: --user=NAME:PASSWORD or --password");
		size_t nl = (size_t)(colon - f->user);
		char *both = malloc(strlen(f->user) + 2);
		if (both == NULL)
			return ku_errf(errbuf, errlen, KU_ERR_NOMEM, "out of memory");
		memcpy(both, f->user, nl);
		both[nl] = '\0';
		strcpy(both + nl + 1, colon + 1);
		o->co_user = both;
		o->co_password = both + nl + 1;
		o->co_owned = both;
	}
	if (o->co_user && o->co_user[0] == '\0')
		return ku_errf(errbuf, errlen, KU_ERR_USAGE, "--user: empty user name");
	return 0;
}

void ku_conn_opts_free(ku_conn_opts *o)
{
	free(o->co_owned);
	o->co_owned = NULL;
}

static int fail(int rc, const char *msg)
{
	fprintf(stderr, "Error: %s\n", msg);
	return rc == KU_ERR_USAGE ? 2 : 1;
}

static int cmd_snapshot_save(int argc, char **argv)
{
	ku_conn_flags cf = {0};
	int compress = 0;
	ku_flag flags[] = {KU_CONN_FLAGS(cf), {"compress", KU_FLAG_BOOL, NULL, &compress},
			   {NULL, 0, NULL, NULL}};
	char *pos[2];
	int npos;
	char eb[KU_ERRLEN];
	int rc = ku_flags_parse(argc, argv, flags, pos, 2, &npos, eb, sizeof(eb));
	if (rc == 0 && npos != 1)
		rc = ku_errf(eb, sizeof(eb), KU_ERR_USAGE, "snapshot save expects one argument");
	ku_conn_opts o = {0};
	char *buf = NULL;
	if (rc == 0)
		rc = ku_conn_opts_from_flags(&o, &cf, &buf, eb, sizeof(eb));
	if (rc) {
		ku_conn_opts_free(&o);
		free(buf);
		return fail(rc, eb);
	}
	ku_save_result res;
	ku_save_opts so = {compress, 1};
	rc = ku_snapshot_save(&o, &so, pos[0], &res, eb, sizeof(eb));
	ku_conn_opts_free(&o);
	free(buf);
	if (rc)
		return fail(rc, eb);
	printf("Snapshot saved at %s\n", pos[0]);
	return 0;
}

int main(int argc, char **argv)
{
	/* No OpenSSL clean-up at exit: gRPC's threads may still be in a TLS handshake then (a
	 * subchannel reconnecting after a failed dial), and OpenSSL freed under them crashed 1
	 * run in ~40 under load (SIGSEGV in RAND_get_rand_method, after the error was printed).
	 * Before gRPC initialises OpenSSL; the process's exit returns the memory anyway. */
	OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, NULL);
	if (argc < 2 || strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 ||
	    strcmp(argv[1], "-h") == 0) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	if (strcmp(argv[1], "snapshot") == 0 && argc >= 3) {
		if (strcmp(argv[2], "save") == 0)
			return cmd_snapshot_save(argc - 3, argv + 3);
		if (strcmp(argv[2], "status") == 0)
			return ku_cmd_snapshot_status(argc - 3, argv + 3);
		if (strcmp(argv[2], "restore") == 0)
			return ku_cmd_snapshot_restore(argc - 3, argv + 3);
	}
	if (strcmp(argv[1], "backup") == 0)
		return ku_cmd_backup(argc - 2, argv + 2);
	usage(stderr);
	return 2;
}
