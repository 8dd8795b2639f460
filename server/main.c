/*
 * main.c - start a Keelson member the way etcd starts: flags, data dir, storage, the node
 * loop, the gRPC services and the HTTP endpoints; stop cleanly on SIGINT or SIGTERM.
 */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "server/peer.h"
#include "server/server.h"

/* mkdir -p with etcd's private mode. */
static int make_dirs(const char *path)
{
	char buf[4096];
	size_t len = strlen(path);
	if (len == 0 || len >= sizeof(buf))
		return -1;
	memcpy(buf, path, len + 1);
	for (size_t i = 1; i <= len; i++) {
		if (buf[i] == '/' || buf[i] == '\0') {
			char c = buf[i];
			buf[i] = '\0';
			if (mkdir(buf, 0700) != 0 && errno != EEXIST)
				return -1;
			buf[i] = c;
		}
	}
	return 0;
}

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint64_t get_be64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

/* Whether the data dir already holds this member's id (not a new data dir). */
static int has_member_id(storage *st)
{
	storage_reader *r;
	storage_arena a;
	void *mid;
	size_t mlen;
	storage_arena_init(&a);
	if (storage_read_begin(st, &r) != 0) {
		storage_arena_free(&a);
		return 1; /* load_or_store_ids meets the same error */
	}
	int rc = storage_read_meta(r, "member_id", &a, &mid, &mlen);
	storage_read_end(r);
	storage_arena_free(&a);
	return rc != STORAGE_ERR_NOT_FOUND;
}

/* The ids are fixed when the data dir is made: a restart keeps them whatever the flags say. */
static int load_or_store_ids(storage *st, member_info *mi, int joining)
{
	storage_reader *r;
	storage_arena a;
	void *cid, *mid;
	size_t clen, mlen;
	storage_arena_init(&a);
	int rc = storage_read_begin(st, &r);
	if (rc)
		return rc;
	int rc1 = storage_read_meta(r, "cluster_id", &a, &cid, &clen);
	int rc2 = storage_read_meta(r, "member_id", &a, &mid, &mlen);
	if (rc2 == 0 && mlen == 8)
		mi->member_id = get_be64(mid);
	if (rc1 == 0 && clen == 8)
		mi->cluster_id = get_be64(cid);
	else if (rc2 == 0 && joining)
		mi->cluster_id = 0; /* joined, and still to learn the cluster id from a peer */
	storage_read_end(r);
	storage_arena_free(&a);
	if (rc2 == 0)
		return 0;
	if (rc2 != STORAGE_ERR_NOT_FOUND)
		return rc2;

	/* A new data dir. A member joining an existing cluster cannot compute the cluster id
	 * from --initial-cluster (it lists members added since): it learns it from its peers. */
	if (joining)
		mi->cluster_id = 0;
	storage_batch *b;
	uint8_t buf[8];
	rc = storage_batch_begin(st, &b);
	if (rc)
		return rc;
	put_be64(buf, mi->member_id);
	rc = storage_batch_meta_put(b, "member_id", buf, 8);
	if (rc == 0 && mi->cluster_id != 0) {
		put_be64(buf, mi->cluster_id);
		rc = storage_batch_meta_put(b, "cluster_id", buf, 8);
	}
	if (rc) {
		storage_batch_abort(b);
		return rc;
	}
	storage_stats stats;
	rc = storage_stat(st, &stats);
	return rc ? (storage_batch_abort(b), rc) : storage_batch_commit(b, stats.st_applied_index);
}

char *server_read_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (f == NULL)
		return NULL;
	char *buf = NULL;
	size_t len = 0, cap = 0, n;
	char chunk[4096];
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
		if (len + n + 1 > cap) {
			cap = (len + n + 1) * 2;
			char *nb = realloc(buf, cap);
			if (nb == NULL) {
				free(buf);
				fclose(f);
				return NULL;
			}
			buf = nb;
		}
		memcpy(buf + len, chunk, n);
		len += n;
	}
	fclose(f);
	if (buf == NULL)
		buf = calloc(1, 1);
	else
		buf[len] = '\0';
	return buf;
}

/* The TLS of the https client URLs (*out stays NULL without one), with the
 * --cert-file/--key-file pair or, with --auto-tls and no pair given, etcd's self-signed one.
 * http.c listens; the connections are ended by tls_serve.c. */
static int client_tls(tls_server **out, const config *cfg, const char *ciphers, server_ctx *sc, api_server *as)
{
	char auto_cert[4096], auto_key[4096];
	const char *cert_file = cfg->cert_file, *key_file = cfg->key_file;
	*out = NULL;
	/* etcd makes the pair whenever --auto-tls is on and no pair is given, https or not. */
	if (cfg->auto_tls && (cert_file[0] == '\0' || key_file[0] == '\0')) {
		if (tls_auto_cert(cfg, auto_cert, auto_key, sizeof(auto_cert)) != 0)
			return -1;
		cert_file = auto_cert;
		key_file = auto_key;
	}
	const char *https_url = NULL;
	for (int i = 0; i < cfg->listen_client.n && https_url == NULL; i++)
		if (strncmp(cfg->listen_client.url[i], "https://", 8) == 0)
			https_url = cfg->listen_client.url[i];
	if (https_url == NULL)
		return 0;
	if (cfg->cipher_suites[0] && !tls_ciphers_http2_ok(cfg->cipher_suites)) {
		log_at(LOG_FATAL, "listener failed", "error",
		       "http2: TLSConfig.CipherSuites is missing an HTTP/2-required AES_128_GCM_SHA256 cipher "
		       "(need at least one of TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 or "
		       "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)", NULL);
		return -1;
	}
	if (cert_file[0] == '\0' || key_file[0] == '\0') {
		log_at(LOG_FATAL, "TLS key/cert (--cert-file, --key-file) must be provided for client url with HTTPS scheme",
		       "url", https_url, NULL);
		return -1;
	}
	tls_server_options o = {
		.to_cert_file = cert_file,
		.to_key_file = key_file,
		.to_trusted_ca_file = cfg->trusted_ca_file,
		.to_crl_file = cfg->client_crl_file,
		.to_ciphers = ciphers,
		.to_client_cert_auth = cfg->client_cert_auth,
		.to_sc = sc,
		.to_api = as,
	};
	if (tls_version_bounds(cfg, &o.to_min_version, &o.to_max_version) != 0)
		return -1;
	return tls_server_new(out, &o);
}

/*
 * Peer TLS from the --peer-* flags, with etcd's rules: https peer URLs need a cert and key
 * (or --peer-auto-tls, which makes them under <data-dir>/fixtures/peer); on http URLs the
 * files are ignored with a warning. Sets cfg->peer_tls (NULL: no https peer URL). 0 or -1
 * (logged).
 */
static int setup_peer_tls(config *cfg)
{
	int n_https = 0;
	int have_files = cfg->peer_cert_file[0] != '\0' || cfg->peer_key_file[0] != '\0';
	const char *https_hp = "";
	char hps[CONFIG_MAX_URLS][256];
	const char *hosts[CONFIG_MAX_URLS];
	for (int i = 0; i < cfg->listen_peer.n; i++) {
		const char *url = cfg->listen_peer.url[i];
		if (config_url_host_port(url, hps[i], sizeof(hps[i])) != 0)
			hps[i][0] = '\0';
		hosts[i] = hps[i];
		if (strncmp(url, "https://", 8) == 0) {
			if (n_https++ == 0)
				https_hp = hps[i];
			continue;
		}
		if (have_files)
			log_at(LOG_WARN, "scheme is HTTP while key and cert files are present; ignoring key and cert files",
			       "peer-url", url, NULL);
		if (cfg->peer_client_cert_auth)
			log_at(LOG_WARN, "scheme is HTTP while --peer-client-cert-auth is enabled; ignoring client cert auth for this URL",
			       "peer-url", url, NULL);
	}
	if (cfg->peer_auto_tls && have_files)
		log_at(LOG_WARN, "ignoring peer auto TLS since certs given", NULL);
	/* With both schemes, each listener serves its own (etcd 3.4 does the same), and each
	 * member is dialed in the scheme of its peer URL. */
	if (n_https == 0)
		return 0;
	char dir[4096], cert[4200], key[4200];
	peer_tls_config tc = {
		.ptc_cert_file = cfg->peer_cert_file,
		.ptc_key_file = cfg->peer_key_file,
		.ptc_trusted_ca_file = cfg->peer_trusted_ca_file,
		.ptc_crl_file = cfg->peer_crl_file,
		.ptc_allowed_cn = cfg->peer_cert_allowed_cn,
		.ptc_client_cert_auth = cfg->peer_client_cert_auth,
		.ptc_skip_client_san = cfg->peer_skip_client_san,
	};
	/* etcd 3.5 applies --tls-min-version/--tls-max-version to peers too. */
	if (tls_version_bounds(cfg, &tc.ptc_min_version, &tc.ptc_max_version) != 0)
		return -1;
	char why[256] = "";
	if (!have_files && cfg->peer_auto_tls) {
		snprintf(dir, sizeof(dir), "%s/fixtures/peer", cfg->data_dir);
		if (peer_tls_self_cert(dir, hosts, cfg->listen_peer.n, why, sizeof(why)) != 0) {
			log_at(LOG_FATAL, "failed to get peer self-signed certs", "error", why, NULL);
			return -1;
		}
		snprintf(cert, sizeof(cert), "%s/cert.pem", dir);
		snprintf(key, sizeof(key), "%s/key.pem", dir);
		tc.ptc_cert_file = cert;
		tc.ptc_key_file = key;
		tc.ptc_skip_verify = 1;
	}
	if (tc.ptc_cert_file[0] == '\0' || tc.ptc_key_file[0] == '\0') {
		char msg[512];
		snprintf(msg, sizeof(msg), "cannot listen on TLS for %.255s: KeyFile and CertFile are not presented",
			 https_hp);
		log_at(LOG_FATAL, msg, NULL);
		return -1;
	}
	char info[2048];
	snprintf(info, sizeof(info), "cert = %s, key = %s, trusted-ca = %s, client-cert-auth = %s, crl-file = %s",
		 tc.ptc_cert_file, tc.ptc_key_file, tc.ptc_trusted_ca_file,
		 tc.ptc_client_cert_auth ? "true" : "false", tc.ptc_crl_file);
	int rc = peer_tls_new(&cfg->peer_tls, &tc, why, sizeof(why));
	if (rc != 0) {
		log_at(LOG_FATAL, "cannot set up peer TLS", "error", why, NULL);
		return -1;
	}
	log_at(LOG_INFO, "starting with peer TLS", "tls-info", info, NULL);
	return 0;
}

static int run(config *cfgp);

/*
 * Every client connection is a file descriptor, and the soft limit is often 1024 while the
 * hard one is far higher: raise the soft limit to the hard one, as Go's runtime does for
 * etcd at start-up (Go 1.19+), so that thousands of clients (an apiserver fleet, watchers)
 * are not refused at 1024. Nothing here uses select(), so no FD_SETSIZE bound applies.
 */
static void raise_open_files_limit(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max)
		return;
	rl.rlim_cur = rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
		log_at(LOG_WARN, "cannot raise the open files limit", "error", strerror(errno), NULL);
}

int main(int argc, char **argv)
{
	config cfg;
	int rc = config_parse(&cfg, argc, argv);
	if (rc == 0)
		rc = run(&cfg);
	config_free(&cfg);
	return rc;
}

static int run(config *cfgp)
{
	config cfg = *cfgp; /* a shallow copy: strings stay owned by *cfgp */
	int rc;
	if (cfg.show_help) {
		config_print_usage();
		return 0;
	}
	if (cfg.show_version) {
		printf("keelson Version: %s\netcd Version: %s\nAPI Version: 3.5\n", KEELSON_VERSION, cfg.etcd_version);
		return 0;
	}
	log_setup(cfg.logger, cfg.log_level);
	signal(SIGPIPE, SIG_IGN);
	raise_open_files_limit();
	/* etcd refuses an unknown --cipher-suites name before it starts anything. */
	char ciphers[2048];
	if (cfg.cipher_suites[0] && tls_cipher_list(cfg.cipher_suites, ciphers, sizeof(ciphers)) != 0)
		return 1;
	char why[256];
	if (tls_check_versions(&cfg, why, sizeof(why)) != 0) {
		log_at(LOG_WARN, "failed to verify flags", "error", why, NULL);
		return 1;
	}

	/* Signals are taken synchronously by main; every other thread inherits the mask. */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);

	char member_dir[4096];
	snprintf(member_dir, sizeof(member_dir), "%s/member", cfg.data_dir);
	if (make_dirs(member_dir) != 0) {
		log_at(LOG_FATAL, "cannot create data dir", "path", member_dir, "error", strerror(errno), NULL);
		return 1;
	}
	log_at(LOG_INFO, "starting keelson", "name", cfg.name, "data-dir", cfg.data_dir,
	       "etcd-version", cfg.etcd_version, NULL);
	/* A stopped etcd member's data dir becomes this member's, once (server/etcdimport.c). */
	if (etcd_import_maybe(&cfg, member_dir) != 0)
		return 1;

	server_ctx sc;
	memset(&sc, 0, sizeof(sc));
	sc.cfg = &cfg;
	/* etcd's quota: 2 GiB unless set. The LMDB map must be larger than the quota, so a
	 * write is refused with NOSPACE before LMDB itself runs out of room. */
	sc.quota_bytes = cfg.quota_backend_bytes ? cfg.quota_backend_bytes : 2ULL << 30;
	storage_options so = {0};
	if (sc.quota_bytes + (1ULL << 30) > (8ULL << 30))
		so.so_map_size = sc.quota_bytes + (1ULL << 30);
	rc = storage_open(member_dir, &so, &sc.st);
	if (rc) {
		log_at(LOG_FATAL, "cannot open storage", "path", member_dir, "error", storage_strerror(rc), NULL);
		return 1;
	}
	if (setup_peer_tls(&cfg) != 0) {
		storage_close(sc.st);
		return 1;
	}
	rc = member_compute_ids(&cfg, &sc.mi, why, sizeof(why));
	if (rc) {
		log_at(LOG_FATAL, "invalid --initial-cluster", "error", why, NULL);
		peer_tls_free(cfg.peer_tls);
		storage_close(sc.st);
		return 1;
	}
	/* A new data dir joining an existing cluster: the id is the one MemberAdd made, which
	 * only the running members know (etcd's GetClusterFromRemotePeers). A restart keeps
	 * the stored id and asks nobody. */
	remote_members remote;
	memset(&remote, 0, sizeof(remote));
	if (strcmp(cfg.initial_cluster_state, "existing") == 0 && !has_member_id(sc.st)) {
		uint64_t id;
		if (member_id_from_peers(&cfg, &remote, &id, why, sizeof(why)) != 0) {
			log_at(LOG_FATAL, "failed to start member: cannot join the existing cluster", "error", why, NULL);
			peer_tls_free(cfg.peer_tls);
			storage_close(sc.st);
			return 1;
		}
		sc.mi.member_id = id;
	}
	rc = load_or_store_ids(sc.st, &sc.mi, strcmp(cfg.initial_cluster_state, "existing") == 0);
	if (rc == 0)
		rc = lessor_start(&sc.lessor, &cfg, sc.st);
	if (rc == 0)
		rc = alarm_start(&sc.alarms, sc.st);
	if (rc == 0)
		rc = members_start(&sc.members, &cfg, sc.st, sc.mi.member_id, remote.rm_n > 0 ? &remote : NULL);
	remote_members_free(&remote);
	if (rc == 0)
		rc = auth_start(&sc.auth, &cfg, sc.st);
	if (rc == 0)
		rc = node_start(&sc.nd, &sc);
	/* etcd checks against its peers before serving any client. Its peers are asked over the
	 * peer transport, which lives in the node: the check follows node_start(). */
	if (rc == 0 && cfg.initial_corrupt_check && corrupt_check_initial(&sc) != 0) {
		node_stop(sc.nd);
		node_free(sc.nd);
		peer_tls_free(cfg.peer_tls);
		lessor_free(sc.lessor);
		alarm_free(sc.alarms);
		members_free(sc.members);
		auth_free(sc.auth);
		storage_close(sc.st);
		return 1;
	}
	/* The transport holds its own reference from here on. */
	peer_tls_free(cfg.peer_tls);
	cfg.peer_tls = NULL;
	if (rc) {
		if (rc != AUTH_ERR_TOKEN_OPTIONS && rc != AUTH_ERR_TOKEN_KEY) /* those said why */
			log_at(LOG_FATAL, "cannot start member", "error", storage_strerror(rc), NULL);
		storage_close(sc.st);
		return 1;
	}

	api_options ao = {
		.ao_max_request_bytes = cfg.max_request_bytes,
		.ao_max_streams = cfg.max_concurrent_streams > 0xffffffffu ? 0xffffffffu
									: (uint32_t)cfg.max_concurrent_streams,
		.ao_keepalive_min_time_ms = (int)cfg.grpc_keepalive_min_time_ms,
		.ao_keepalive_interval_ms = (int)cfg.grpc_keepalive_interval_ms,
		.ao_keepalive_timeout_ms = (int)cfg.grpc_keepalive_timeout_ms,
		.ao_threads = 2,
	};
	ao.ao_cipher_list = cfg.cipher_suites[0] ? ciphers : NULL;
	api_server *as;
	rc = api_server_create(&ao, &as);
	if (rc == 0)
		rc = kv_register(as, &sc);
	if (rc == 0)
		rc = maint_register(as, &sc);
	if (rc == 0)
		rc = lease_register(as, &sc);
	if (rc == 0)
		rc = members_register(as, &sc);
	if (rc == 0)
		rc = snapshot_register(as, &sc);
	if (rc == 0)
		rc = auth_register(as, &sc);
	if (rc == 0)
		rc = watch_hub_start(&sc.hub, &sc, as);
	tls_server *ts = NULL;
	if (rc == 0)
		rc = client_tls(&ts, &cfg, cfg.cipher_suites[0] ? ciphers : NULL, &sc, as);
	if (rc == 0)
		rc = api_server_start(as);
	http_server *hs = NULL;
	if (rc == 0 && http_start(&hs, &sc, &cfg.listen_metrics, &cfg.listen_client, as, ts) != 0)
		rc = -1;
	corrupt_monitor *cm = NULL;
	if (rc == 0 && corrupt_monitor_start(&cm, &sc) != 0) {
		log_at(LOG_FATAL, "cannot start the corruption check", NULL);
		rc = -1;
	}
	/* Not fatal: without it the member only keeps more memory after bursts. */
	heap_trimmer *trimmer = NULL;
	if (rc == 0 && heap_trimmer_start(&trimmer) != 0)
		log_at(LOG_WARN, "cannot start the heap trimmer", NULL);
	server_backup *backup = NULL;
	if (rc == 0 && server_backup_start(&backup, &sc) != 0)
		rc = -1; /* logged; a backup directory asked for and unusable stops the start */
	atomic_store(&sc.backup, backup);
	if (rc) {
		heap_trimmer_stop(trimmer);
		corrupt_monitor_stop(cm); /* it uses the node and the store */
		http_stop(hs);
		tls_server_free(ts);
		node_stop(sc.nd);
		node_free(sc.nd);
		storage_close(sc.st);
		return 1;
	}
	char ids[64];
	snprintf(ids, sizeof(ids), "%llx", (unsigned long long)sc.mi.member_id);
	log_at(LOG_INFO, "ready to serve client requests", "member-id", ids, NULL);

	int sig = 0;
	sigwait(&sigs, &sig);
	log_at(LOG_INFO, "received signal; shutting down", "signal", sig == SIGINT ? "SIGINT" : "SIGTERM", NULL);
	/* Stop taking calls, answer every write already queued, then end what is left. */
	corrupt_monitor_stop(cm); /* it proposes alarms: stop it before the node */
	heap_trimmer_stop(trimmer);
	http_stop(hs);
	tls_server_stop(ts); /* no connection hands itself to gRPC after this */
	api_server_shutdown(as);
	node_stop(sc.nd);
	/* After the loop (which pauses backups) and before the node and the store go. */
	server_backup_stop(sc.backup);
	sc.backup = NULL;
	watch_hub_stop(sc.hub);
	rangestream_drain(&sc); /* their threads read the store */
	api_server_destroy(as);
	tls_server_free(ts);
	rangestream_free(&sc);
	watch_hub_free(sc.hub);
	node_free(sc.nd);
	lessor_free(sc.lessor);
	alarm_free(sc.alarms);
	members_free(sc.members);
	auth_free(sc.auth);
	storage_close(sc.st);
	log_at(LOG_INFO, "stopped", NULL);
	return 0;
}
