/*
 * keelsonutl.h - the backup and restore tool (after etcd's etcdutl/etcdctl snapshot):
 *
 *   keelsonutl snapshot save FILE --endpoints=host:port[,...] [--compress] (client.c, save.c)
 *   keelsonutl snapshot status FILE [-w simple|table|json|fields] (status.c)
 *   keelsonutl snapshot restore FILE --data-dir DIR --name ...    (restore.c; ids from server/identity.h)
 *   keelsonutl backup --endpoints=... --dir DIR (--interval D | --schedule CRON) [--retain N]
 *                     [--max-age D] [--thin] [--compress] [--verify] [--metrics-file F] [--once]
 *                                                                 (backup.c; backup/backup.h decides
 *                                                                 when and what to keep)
 * gzip reading and writing in compress.c, the terminal progress line in progress.c.
 *
 * Private to tools/keelsonutl: one header for the program's files. Errors are the module's
 * own negative codes with a message written into the caller's errbuf (ku_err*).
 */
#ifndef KEELSON_TOOLS_KEELSONUTL_H
#define KEELSON_TOOLS_KEELSONUTL_H

#include <stddef.h>
#include <stdint.h>

#include "server/identity.h"

#include "storage/storage.h"

/* Error codes: 0 is success; keelsonutl owns -2000..-2099. Every failing call also writes
 * a one-line message into its errbuf. */
enum {
	KU_OK = 0,
	KU_ERR_USAGE = -2000,   /* bad flags or arguments */
	KU_ERR_CONNECT = -2001, /* no endpoint became ready within --dial-timeout */
	KU_ERR_RPC = -2002,     /* the call failed (gRPC status in the message) */
	KU_ERR_IO = -2003,      /* a local file operation failed */
	KU_ERR_CORRUPT = -2004, /* a snapshot failed its checks (hash, truncation, format) */
	KU_ERR_EXISTS = -2005,  /* a target that must not exist does */
	KU_ERR_NOMEM = -2006,
	KU_ERR_STORAGE = -2007, /* a storage_* call failed (message says which) */
	KU_ERR_UNSUPPORTED = -2008,
};

#define KU_MAX_ENDPOINTS 16
#define KU_ERRLEN 1024

/* ---- errors (main.c) ---- */
/* Writes a printf-style message into errbuf and returns code. */
int ku_errf(char *errbuf, size_t errlen, int code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* ---- connections (client.c) ---- */

typedef struct ku_conn_opts {
	const char *co_endpoints[KU_MAX_ENDPOINTS]; /* "host:port", "http://..", "https://.." */
	int co_n_endpoints;
	double co_dial_timeout;    /* seconds to wait for a connection (etcdctl's 2s) */
	double co_command_timeout; /* seconds for the whole call; 0: no deadline */
	const char *co_cacert, *co_cert, *co_key; /* PEM file paths; TLS if any is set */
	const char *co_user, *co_password;         /* both or neither: Auth.Authenticate first,
						    * its token on every call */
	char *co_owned;    /* owned: the split --user NAME:PASSWORD; ku_conn_opts_free() */
} ku_conn_opts;

void ku_conn_opts_free(ku_conn_opts *o);

/* Receives the snapshot stream in order, with the bytes the server says remain after
 * this piece; non-zero stops the call (returned by it). */
typedef int (*ku_sink_fn)(void *ctx, const void *buf, size_t len, uint64_t remaining);

/*
 * Calls Maintenance.Snapshot on the first endpoint that connects (in order) and feeds
 * every blob to sink. *endpoint_used (if not NULL) gets the endpoint's index.
 * Errors: KU_ERR_CONNECT, KU_ERR_RPC, KU_ERR_UNSUPPORTED, or the value sink returned.
 */
int ku_snapshot_stream(const ku_conn_opts *o, ku_sink_fn sink, void *ctx, int *endpoint_used,
		       char *errbuf, size_t errlen);

/* Maintenance.HashKV at rev on endpoint index ep. KU_ERR_RPC if the server refuses (e.g.
 * the revision is compacted: the message then holds the server's text). */
int ku_hash_kv(const ku_conn_opts *o, int ep, int64_t rev, uint32_t *hash,
	       int64_t *compact_rev, char *errbuf, size_t errlen);

/* Parses "a,b,c" into o->co_endpoints (pointers into s, which is modified). */
int ku_parse_endpoints(ku_conn_opts *o, char *s, char *errbuf, size_t errlen);

/* ---- snapshot save (save.c) ---- */

/* How save writes: plain (the file etcdctl writes) or gzip-compressed. */
typedef struct ku_save_opts {
	int so_compress;
	int so_progress; /* a progress line while receiving (only on a terminal anyway) */
} ku_save_opts;

typedef struct ku_save_result {
	uint64_t sr_bytes;               /* bytes received, trailer included */
	uint64_t sr_file_bytes;          /* bytes of the file at path (compressed if so) */
	storage_etcd_file_info sr_info;  /* storage_etcd_check() of the saved file */
	int sr_endpoint;                 /* index of the endpoint used */
} ku_save_result;

/*
 * Streams a snapshot into path.part (created exclusively, mode 0600), checks the trailing
 * SHA-256 while it arrives, checks the whole file (storage_etcd_check, hash required),
 * fsyncs it, renames it to path and fsyncs the directory. Nothing is left at path.part on
 * an error, and path only ever appears whole. With so_compress, the checked file is
 * compressed into path.gz.part (fsynced) and that is renamed to path instead.
 * so may be NULL (plain, no progress).
 */
int ku_snapshot_save(const ku_conn_opts *o, const ku_save_opts *so, const char *path,
		     ku_save_result *res, char *errbuf, size_t errlen);

/* ---- files (save.c) ---- */
/* fsync of the directory that holds path (path's dirname). */
int ku_fsync_parent(const char *path, char *errbuf, size_t errlen);
int ku_fsync_dir(const char *dir, char *errbuf, size_t errlen);
/* Removes a directory tree (only used on our own temporary directories). */
int ku_remove_tree(const char *path);

/* ---- progress on a terminal (progress.c) ---- */
typedef struct ku_progress {
	int pg_on;          /* stderr is a terminal */
	int pg_drawn;
	const char *pg_what;
	uint64_t pg_total;  /* 0: unknown */
	uint64_t pg_done;
	double pg_start, pg_last;
} ku_progress;
/* Nothing is ever printed when stderr is not a terminal. */
void ku_progress_start(ku_progress *p, const char *what, uint64_t total);
/* total: 0 keeps the one known. Redraws at most ten times a second. */
void ku_progress_update(ku_progress *p, uint64_t done, uint64_t total);
/* The final line (if anything was drawn) and a newline. */
void ku_progress_end(ku_progress *p);

/* ---- gzip (compress.c) ---- */
/* 1 if the file starts with gzip's magic bytes. */
int ku_is_gzip(const char *path);
/* Writes src gzip-compressed to dst (created exclusively, 0600) and fsyncs it; dst is
 * removed on an error. *out_bytes (if not NULL) gets the compressed size. */
int ku_gzip_file(const char *src, const char *dst, uint64_t *out_bytes, char *errbuf,
		 size_t errlen);
/* Decompresses src into a new temporary file in dir (NULL: $TMPDIR or /tmp); its path goes
 * to tmp and the caller unlinks it. A truncated or damaged stream is KU_ERR_CORRUPT
 * (nothing left). */
int ku_gunzip_to_temp(const char *src, const char *dir, char *tmp, size_t tmplen, char *errbuf,
		      size_t errlen);

/* ---- snapshot status (status.c) ---- */
/* etcdctl's humanize.Bytes ("33 kB"). */
void ku_human_bytes(uint64_t n, char *out, size_t len);
int ku_cmd_snapshot_status(int argc, char **argv);
/* An uncompressed path for a snapshot file: path itself, or (gzip) a temporary copy in dir
 * (as ku_gunzip_to_temp) whose path goes to tmp (tmp[0] != 0 then: the caller unlinks it). */
int ku_open_snapshot(const char *path, const char *dir, char *tmp, size_t tmplen,
		     const char **plain, char *errbuf, size_t errlen);

/* ---- member identity: server/identity.h, shared with the server ---- */

#define KU_MAX_MEMBERS IDENTITY_MAX_MEMBERS

/* ---- restore (restore.c) ---- */

typedef struct ku_restore_opts {
	const char *ro_snapshot;
	const char *ro_data_dir;
	const char *ro_name;
	const char *ro_initial_cluster;
	const char *ro_token;
	const char *ro_advertise_peer_urls;
	int ro_skip_hash_check;
	uint64_t ro_bump_revision;
	int ro_mark_compacted;
	int ro_quiet;
} ku_restore_opts;

typedef struct ku_restore_result {
	storage_etcd_file_info rr_info;
	uint64_t rr_member_id, rr_cluster_id;
	int64_t rr_revision;      /* the store revision the new member serves */
	uint64_t rr_applied;      /* its applied index */
	uint64_t rr_skipped;      /* entries not restored (unknown buckets, bad alarms) */
} ku_restore_result;

int ku_restore(const ku_restore_opts *o, ku_restore_result *res, char *errbuf, size_t errlen);
int ku_cmd_snapshot_restore(int argc, char **argv);

/*
 * Imports snapshot into lmdb_dir (must not exist or be empty) and checks what was imported
 * against the file: the store revision and HashKV read back from the new environment.
 * *hash gets the restored store's HashKV at its current revision. For backup --verify.
 */
int ku_verify_import(const char *snapshot, const char *lmdb_dir,
		     const storage_etcd_file_info *want, uint32_t *hash, int64_t *rev,
		     char *errbuf, size_t errlen);

/* ---- backup (backup.c) ---- */
int ku_cmd_backup(int argc, char **argv);

/* ---- flags (main.c): etcd-style "--flag=value", "--flag value", booleans ---- */

typedef enum ku_flag_kind { KU_FLAG_STR, KU_FLAG_BOOL } ku_flag_kind;
typedef struct ku_flag {
	const char *kf_name;  /* without dashes; matched after "-" or "--" */
	ku_flag_kind kf_kind;
	const char **kf_str;  /* KU_FLAG_STR */
	int *kf_bool;         /* KU_FLAG_BOOL */
} ku_flag;

/* Parses argv against flags (NULL-name terminated); positional arguments go to pos
 * (at most maxpos). Returns 0, or KU_ERR_USAGE with a message. */
int ku_flags_parse(int argc, char **argv, const ku_flag *flags, char **pos, int maxpos,
		   int *npos, char *errbuf, size_t errlen);
/* Connection flags shared by save and backup, appended to a flag table. */
#define KU_CONN_FLAGS(v)                                                         \
	{"endpoints", KU_FLAG_STR, &(v).endpoints, NULL},                        \
	{"dial-timeout", KU_FLAG_STR, &(v).dial_timeout, NULL},                  \
	{"command-timeout", KU_FLAG_STR, &(v).command_timeout, NULL},            \
	{"cacert", KU_FLAG_STR, &(v).cacert, NULL},                              \
	{"cert", KU_FLAG_STR, &(v).cert, NULL},                                  \
	{"key", KU_FLAG_STR, &(v).key, NULL},                                    \
	{"user", KU_FLAG_STR, &(v).user, NULL},                                  \
	{"password", KU_FLAG_STR, &(v).password, NULL}

typedef struct ku_conn_flags {
	const char *endpoints, *dial_timeout, *command_timeout, *cacert, *cert, *key, *user,
		*password;
} ku_conn_flags;

/* Turns parsed connection flags into options; endpoints default to 127.0.0.1:2379.
 * buf keeps the endpoint strings and must outlive o. */
int ku_conn_opts_from_flags(ku_conn_opts *o, const ku_conn_flags *f, char **buf,
			    char *errbuf, size_t errlen);

#endif
