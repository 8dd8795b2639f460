/*
 * config.c - etcd's command line: the same flags, ETCD_* environment variables and defaults.
 *
 * Flags follow Go's flag package, which etcd uses: "-f" and "--f" are the same, values come
 * as "--f=v" or "--f v", booleans only as "--f" or "--f=true|false". A flag given on the
 * command line wins over its environment variable.
 *
 * --config-file (or ETCD_CONFIG_FILE) replaces both: etcd's YAML (embed.Config's keys, the
 * flag names, with client-/peer-transport-security sections) over the defaults, with etcd's
 * errors (it decodes YAML to JSON, then JSON into Go types, and says so).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "backup/backup.h"
#include "server/server.h"

typedef enum flag_kind { F_STRING, F_BOOL, F_UINT, F_DURATION_MS, F_URLS, F_IGNORED_STRING, F_IGNORED_BOOL } flag_kind;

typedef struct flag_def {
	const char *name;
	flag_kind kind;
	const char *defval;
	size_t offset; /* into config; unused for ignored flags */
	const char *help;
} flag_def;

#define OFF(f) offsetof(config, f)

/*
 * Every flag etcd 3.4 takes is accepted. Those marked ignored are parsed and validated but
 * have no effect yet (v2, proxy, discovery and TLS flags until their issues land).
 */
static const flag_def flags[] = {
	{"name", F_STRING, "default", OFF(name), "Human-readable name for this member."},
	{"data-dir", F_STRING, "", OFF(data_dir), "Path to the data directory (default '${name}.etcd')."},
	{"wal-dir", F_STRING, "", OFF(wal_dir), "Path to the dedicated wal directory."},
	{"snapshot-count", F_UINT, "100000", OFF(snapshot_count), "Number of committed transactions to trigger a snapshot to disk."},
	{"experimental-snapshot-catchup-entries", F_UINT, "5000", OFF(snapshot_catchup_entries), "Number of entries for a slow follower to catch-up after compacting the raft storage entries (etcd 3.5)."},
	{"heartbeat-interval", F_UINT, "100", OFF(heartbeat_ms), "Time (in milliseconds) of a heartbeat interval."},
	{"election-timeout", F_UINT, "1000", OFF(election_ms), "Time (in milliseconds) for an election to timeout."},
	{"initial-election-tick-advance", F_IGNORED_BOOL, "true", 0, "Whether to fast-forward initial election ticks on boot for faster election."},
	{"listen-peer-urls", F_URLS, "http://localhost:2380", OFF(listen_peer), "List of URLs to listen on for peer traffic."},
	{"listen-client-urls", F_URLS, "http://localhost:2379", OFF(listen_client), "List of URLs to listen on for client traffic."},
	{"max-snapshots", F_IGNORED_STRING, "5", 0, "Maximum number of snapshot files to retain (0 is unlimited)."},
	{"max-wals", F_IGNORED_STRING, "5", 0, "Maximum number of wal files to retain (0 is unlimited)."},
	{"quota-backend-bytes", F_UINT, "0", OFF(quota_backend_bytes), "Raise alarms when backend size exceeds the given quota (0 defaults to low space quota)."},
	{"backend-batch-interval", F_DURATION_MS, "5ms", OFF(backend_batch_interval_ms), "BackendBatchInterval is the maximum time before commit the backend transaction."},
	{"backend-batch-limit", F_UINT, "0", OFF(backend_batch_limit), "BackendBatchLimit is the maximum operations before commit the backend transaction."},
	{"max-txn-ops", F_UINT, "128", OFF(max_txn_ops), "Maximum number of operations permitted in a transaction."},
	{"max-request-bytes", F_UINT, "1572864", OFF(max_request_bytes), "Maximum client request size in bytes the server will accept."},
	{"max-concurrent-streams", F_UINT, "4294967295", OFF(max_concurrent_streams), "Maximum concurrent streams that each client can open at a time."},
	{"grpc-keepalive-min-time", F_DURATION_MS, "5s", OFF(grpc_keepalive_min_time_ms), "Minimum interval duration that a client should wait before pinging server."},
	{"grpc-keepalive-interval", F_DURATION_MS, "2h", OFF(grpc_keepalive_interval_ms), "Frequency duration of server-to-client ping to check if a connection is alive (0 to disable)."},
	{"grpc-keepalive-timeout", F_DURATION_MS, "20s", OFF(grpc_keepalive_timeout_ms), "Additional duration of wait before closing a non-responsive connection (0 to disable)."},
	{"initial-advertise-peer-urls", F_URLS, "http://localhost:2380", OFF(initial_advertise_peer), "List of this member's peer URLs to advertise to the rest of the cluster."},
	{"initial-cluster", F_STRING, "", OFF(initial_cluster), "Initial cluster configuration for bootstrapping (default 'default=http://localhost:2380')."},
	{"initial-cluster-state", F_STRING, "new", OFF(initial_cluster_state), "Initial cluster state ('new' or 'existing')."},
	{"initial-cluster-token", F_STRING, "etcd-cluster", OFF(initial_cluster_token), "Initial cluster token for the etcd cluster during bootstrap."},
	{"advertise-client-urls", F_URLS, "http://localhost:2379", OFF(advertise_client), "List of this member's client URLs to advertise to the public."},
	{"discovery", F_IGNORED_STRING, "", 0, "Discovery URL used to bootstrap the cluster."},
	{"discovery-fallback", F_IGNORED_STRING, "proxy", 0, "Expected behavior ('exit' or 'proxy') when discovery services fails."},
	{"discovery-proxy", F_IGNORED_STRING, "", 0, "HTTP proxy to use for traffic to discovery service."},
	{"discovery-srv", F_IGNORED_STRING, "", 0, "DNS domain used to bootstrap initial cluster."},
	{"discovery-srv-name", F_IGNORED_STRING, "", 0, "Suffix to the dns srv name queried when bootstrapping."},
	{"strict-reconfig-check", F_IGNORED_BOOL, "true", 0, "Reject reconfiguration requests that would cause quorum loss."},
	{"pre-vote", F_BOOL, "false", OFF(pre_vote), "Enable to run an additional Raft election phase."},
	{"auto-compaction-retention", F_STRING, "0", OFF(auto_compaction_retention), "Auto compaction retention length. 0 means disable auto compaction."},
	{"auto-compaction-mode", F_STRING, "periodic", OFF(auto_compaction_mode), "Interpret 'auto-compaction-retention' one of: periodic|revision."},
	{"enable-v2", F_IGNORED_BOOL, "false", 0, "Accept etcd V2 client requests."},
	{"cert-file", F_STRING, "", OFF(cert_file), "Path to the client server TLS cert file."},
	{"key-file", F_STRING, "", OFF(key_file), "Path to the client server TLS key file."},
	{"client-cert-auth", F_BOOL, "false", OFF(client_cert_auth), "Enable client cert authentication."},
	{"client-crl-file", F_STRING, "", OFF(client_crl_file), "Path to the client certificate revocation list file."},
	{"client-cert-allowed-hostname", F_IGNORED_STRING, "", 0, "Allowed TLS hostname for client cert authentication."},
	{"trusted-ca-file", F_STRING, "", OFF(trusted_ca_file), "Path to the client server TLS trusted CA cert file."},
	{"auto-tls", F_BOOL, "false", OFF(auto_tls), "Client TLS using generated certificates."},
	{"peer-cert-file", F_STRING, "", OFF(peer_cert_file), "Path to the peer server TLS cert file."},
	{"peer-key-file", F_STRING, "", OFF(peer_key_file), "Path to the peer server TLS key file."},
	{"peer-client-cert-auth", F_BOOL, "false", OFF(peer_client_cert_auth), "Enable peer client cert authentication."},
	{"peer-trusted-ca-file", F_STRING, "", OFF(peer_trusted_ca_file), "Path to the peer server TLS trusted CA file."},
	{"peer-cert-allowed-cn", F_STRING, "", OFF(peer_cert_allowed_cn), "Allowed CN for inter peer authentication."},
	{"peer-cert-allowed-hostname", F_IGNORED_STRING, "", 0, "Allowed TLS hostname for inter peer authentication."},
	{"peer-auto-tls", F_BOOL, "false", OFF(peer_auto_tls), "Peer TLS using self-generated certificates if --peer-key-file and --peer-cert-file are not provided."},
	{"experimental-peer-skip-client-san-verification", F_BOOL, "false", OFF(peer_skip_client_san), "Skip verification of SAN field in client certificate for peer connections."},
	{"peer-crl-file", F_STRING, "", OFF(peer_crl_file), "Path to the peer certificate revocation list file."},
	{"cipher-suites", F_STRING, "", OFF(cipher_suites), "Comma-separated list of supported TLS cipher suites between client/server and peers."},
	{"tls-min-version", F_STRING, "TLS1.2", OFF(tls_min_version), "Minimum TLS version supported by etcd. Possible values: TLS1.2, TLS1.3."},
	{"tls-max-version", F_STRING, "", OFF(tls_max_version), "Maximum TLS version supported by etcd. Possible values: TLS1.2, TLS1.3 (empty defers to Go)."},
	{"cors", F_IGNORED_STRING, "*", 0, "Comma-separated whitelist of origins for CORS, or cross-origin resource sharing."},
	{"host-whitelist", F_IGNORED_STRING, "*", 0, "Acceptable hostnames from HTTP client requests."},
	{"auth-token", F_STRING, "simple", OFF(auth_token), "Specify a v3 authentication token type and its options ('simple' or 'jwt')."},
	{"bcrypt-cost", F_UINT, "10", OFF(bcrypt_cost), "Specify the cost / strength of the bcrypt algorithm for hashing auth passwords. Valid values are between 4 and 31."},
	{"auth-token-ttl", F_UINT, "300", OFF(auth_token_ttl), "The lifetime in seconds of the auth token."},
	{"enable-pprof", F_IGNORED_BOOL, "false", 0, "Enable runtime profiling data via HTTP server."},
	{"metrics", F_IGNORED_STRING, "basic", 0, "Set level of detail for exported metrics, specify 'extensive' to include server side grpc histogram metrics."},
	{"listen-metrics-urls", F_URLS, "", OFF(listen_metrics), "List of URLs to listen on for the metrics and health endpoints."},
	{"logger", F_STRING, "capnslog", OFF(logger), "Specify 'zap' for structured logging or 'capnslog'."},
	{"log-outputs", F_STRING, "default", OFF(log_outputs), "Specify 'stdout' or 'stderr' to skip journald logging even when running under systemd."},
	{"log-level", F_STRING, "info", OFF(log_level), "Configures log level. Only supports debug, info, warn, error, panic, or fatal."},
	{"proxy", F_IGNORED_STRING, "off", 0, "Proxy mode setting ('off', 'readonly' or 'on')."},
	{"proxy-failure-wait", F_IGNORED_STRING, "5000", 0, "Time (in milliseconds) an endpoint will be held in a failed state."},
	{"proxy-refresh-interval", F_IGNORED_STRING, "30000", 0, "Time (in milliseconds) of the endpoints refresh interval."},
	{"proxy-dial-timeout", F_IGNORED_STRING, "1000", 0, "Time (in milliseconds) for a dial to timeout."},
	{"proxy-write-timeout", F_IGNORED_STRING, "5000", 0, "Time (in milliseconds) for a write to timeout."},
	{"proxy-read-timeout", F_IGNORED_STRING, "0", 0, "Time (in milliseconds) for a read to timeout."},
	{"experimental-initial-corrupt-check", F_BOOL, "false", OFF(initial_corrupt_check), "Enable to check data corruption before serving any client/peer traffic."},
	{"experimental-corrupt-check-time", F_DURATION_MS, "0s", OFF(corrupt_check_ms), "Duration of time between cluster corruption check passes."},
	{"experimental-enable-v2v3", F_IGNORED_STRING, "", 0, "v3 prefix for serving emulated v2 state."},
	{"experimental-backend-bbolt-freelist-type", F_IGNORED_STRING, "array", 0, "Freelist type used by the backend (accepted for compatibility; LMDB has its own)."},
	{"experimental-enable-lease-checkpoint", F_BOOL, "false", OFF(lease_checkpoint), "Enable to persist lease remaining TTL to prevent indefinite auto-renewal of long lived leases."},
	{"experimental-lease-checkpoint-interval", F_DURATION_MS, "5m", OFF(lease_checkpoint_interval_ms), "Duration of periodic lease checkpoints (with --experimental-enable-lease-checkpoint)."},
	{"experimental-compaction-batch-limit", F_IGNORED_STRING, "1000", 0, "Sets the maximum revisions deleted in each compaction batch."},
	{"experimental-peer-skip-client-san-verification", F_IGNORED_BOOL, "false", 0, "Skip verification of SAN field in client certificate for peer connections."},
	{"experimental-watch-progress-notify-interval", F_DURATION_MS, "10m", OFF(watch_progress_notify_ms), "Duration of periodic watch progress notifications."},
	{"experimental-warning-apply-duration", F_IGNORED_STRING, "100ms", 0, "Time duration after which a warning is generated if request takes more time."},
	{"force-new-cluster", F_BOOL, "false", OFF(force_new_cluster), "Force to create a new one member cluster."},
	{"debug", F_IGNORED_BOOL, "false", 0, "Enable debug-level logging for etcd (deprecated: use --log-level=debug)."},
	{"log-package-levels", F_IGNORED_STRING, "", 0, "Specify a particular log level for each etcd package."},
	{"etcd-version", F_STRING, KEELSON_DEFAULT_ETCD_VERSION, OFF(etcd_version), "Keelson: the etcd version this member reports in Status and /version."},
	{"version", F_BOOL, "false", OFF(show_version), "Print the version and exit."},
	{"backup-dir", F_STRING, "", OFF(backup_dir), "Take scheduled backups (etcd snapshot files) into this directory (Keelson; empty: off)."},
	{"backup-interval", F_STRING, "", OFF(backup_interval), "Time between backups, e.g. 1h or 30m (default 1h; exclusive with --backup-schedule)."},
	{"backup-schedule", F_STRING, "", OFF(backup_schedule), "Take backups on a cron schedule ('0 */6 * * *', @daily) instead of an interval."},
	{"backup-utc", F_BOOL, "false", OFF(backup_utc), "Read --backup-schedule in UTC rather than local time."},
	{"backup-retain", F_UINT, "0", OFF(backup_retain), "Keep only the newest N backups (0: no count limit)."},
	{"backup-max-age", F_STRING, "", OFF(backup_max_age), "Remove backups older than this duration, e.g. 168h (the newest always stays)."},
	{"backup-thin", F_BOOL, "false", OFF(backup_thin), "Thin old backups exponentially: hourly after 1h, daily after 1d, weekly after 1w, 30-daily after 8w."},
	{"backup-compress", F_BOOL, "false", OFF(backup_compress), "Write backups gzip-compressed (.db.gz)."},
	{"config-file", F_STRING, "", OFF(config_file), "Path to the server configuration file. Note that if a configuration file is provided, other command line flags and environment variables will be ignored."},
};

#define NFLAGS (sizeof(flags) / sizeof(flags[0]))

void config_print_usage(void)
{
	fprintf(stderr, "Usage:\n\n  keelson [flags]\n    Start a Keelson member (etcd v3 compatible).\n\n"
			"  keelson --version\n    Show the version.\n\n"
			"  keelson -h | --help\n    Show the help information.\n\nFlags:\n");
	for (size_t i = 0; i < NFLAGS; i++)
		fprintf(stderr, "  --%s '%s'\n    %s\n", flags[i].name, flags[i].defval, flags[i].help);
}

/* Go's time.ParseDuration, for the units etcd's durations use; result in milliseconds. */
static int parse_duration_ms(const char *s, uint64_t *out)
{
	double total = 0;
	const char *p = s;
	if (strcmp(s, "0") == 0) {
		*out = 0;
		return 0;
	}
	if (*p == '\0')
		return -1;
	while (*p) {
		char *end;
		errno = 0;
		double v = strtod(p, &end);
		if (end == p || errno != 0 || v < 0)
			return -1;
		p = end;
		double unit;
		if (strncmp(p, "ns", 2) == 0) { unit = 1e-6; p += 2; }
		else if (strncmp(p, "us", 2) == 0) { unit = 1e-3; p += 2; }
		else if (strncmp(p, "ms", 2) == 0) { unit = 1; p += 2; }
		else if (*p == 's') { unit = 1000; p += 1; }
		else if (*p == 'm') { unit = 60000; p += 1; }
		else if (*p == 'h') { unit = 3600000; p += 1; }
		else return -1;
		total += v * unit;
	}
	*out = (uint64_t)total;
	return 0;
}

static int parse_bool(const char *s, int *out)
{
	static const char *const t[] = {"1", "t", "T", "true", "TRUE", "True"};
	static const char *const f[] = {"0", "f", "F", "false", "FALSE", "False"};
	for (size_t i = 0; i < 6; i++) {
		if (strcmp(s, t[i]) == 0) { *out = 1; return 0; }
		if (strcmp(s, f[i]) == 0) { *out = 0; return 0; }
	}
	return -1;
}

static int parse_urls(const char *s, config_urls *out)
{
	for (int i = 0; i < out->n; i++)
		free(out->url[i]);
	out->n = 0;
	if (*s == '\0')
		return 0;
	const char *p = s;
	while (*p) {
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t)(comma - p) : strlen(p);
		if (out->n == CONFIG_MAX_URLS)
			return -1;
		char *u = strndup(p, len);
		char hp[256];
		if (u == NULL || config_url_host_port(u, hp, sizeof(hp)) != 0) {
			free(u);
			return -1;
		}
		out->url[out->n++] = u;
		p += len;
		if (*p == ',')
			p++;
	}
	return 0;
}

int config_url_host_port(const char *url, char *out, size_t outlen)
{
	const char *p;
	if (strncmp(url, "http://", 7) == 0)
		p = url + 7;
	else if (strncmp(url, "https://", 8) == 0)
		p = url + 8;
	else if (strncmp(url, "unix://", 7) == 0 || strncmp(url, "unixs://", 8) == 0)
		return -1;
	else
		return -1;
	size_t len = strcspn(p, "/");
	if (len == 0 || len >= outlen)
		return -1;
	memcpy(out, p, len);
	out[len] = '\0';
	/* A port is required, as etcd requires it for listen URLs. */
	const char *colon = strrchr(out, ':');
	if (colon == NULL || colon[1] == '\0')
		return -1;
	for (const char *c = colon + 1; *c; c++)
		if (!isdigit((unsigned char)*c))
			return -1;
	return 0;
}

static int set_flag(config *cfg, const flag_def *f, const char *val, const char *shown_name)
{
	void *field = (char *)cfg + f->offset;
	int b;
	switch (f->kind) {
	case F_STRING:
		free(*(char **)field);
		*(char **)field = strdup(val);
		return 0;
	case F_IGNORED_STRING:
		return 0;
	case F_BOOL:
		if (parse_bool(val, &b) != 0)
			goto bad;
		*(int *)field = b;
		return 0;
	case F_IGNORED_BOOL:
		if (parse_bool(val, &b) != 0)
			goto bad;
		return 0;
	case F_UINT: {
		char *end;
		errno = 0;
		if (*val == '\0' || *val == '-')
			goto bad;
		unsigned long long v = strtoull(val, &end, 0);
		if (*end != '\0' || errno != 0)
			goto bad;
		*(uint64_t *)field = v;
		return 0;
	}
	case F_DURATION_MS:
		if (parse_duration_ms(val, (uint64_t *)field) != 0)
			goto bad;
		return 0;
	case F_URLS:
		if (parse_urls(val, (config_urls *)field) != 0) {
			fprintf(stderr, "invalid value \"%s\" for flag -%s: URL address does not have the form \"host:port\": %s\n",
				val, shown_name, val);
			return 2;
		}
		return 0;
	}
bad:
	fprintf(stderr, "invalid value \"%s\" for flag -%s: parse error\n", val, shown_name);
	return 2;
}

static const flag_def *find_flag(const char *name, size_t len)
{
	for (size_t i = 0; i < NFLAGS; i++)
		if (strlen(flags[i].name) == len && memcmp(flags[i].name, name, len) == 0)
			return &flags[i];
	return NULL;
}

/* "listen-client-urls" -> "ETCD_LISTEN_CLIENT_URLS" */
static void env_name(const char *flag, char *out, size_t outlen)
{
	size_t n = snprintf(out, outlen, "ETCD_");
	for (const char *p = flag; *p && n + 1 < outlen; p++)
		out[n++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
	out[n] = '\0';
}

static int config_finish(config *cfg);
static int config_from_file(config *cfg, const char *path);

int config_parse(config *cfg, int argc, char **argv)
{
	unsigned char given[NFLAGS];
	memset(cfg, 0, sizeof(*cfg));
	memset(given, 0, sizeof(given));
	for (size_t i = 0; i < NFLAGS; i++)
		if (flags[i].kind != F_IGNORED_STRING && flags[i].kind != F_IGNORED_BOOL)
			set_flag(cfg, &flags[i], flags[i].defval, flags[i].name);

	int i;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (a[0] != '-' || a[1] == '\0')
			break;
		a++;
		if (*a == '-') {
			a++;
			if (*a == '\0') { /* "--" ends the flags */
				i++;
				break;
			}
		}
		if (*a == '-' || *a == '=') {
			fprintf(stderr, "bad flag syntax: %s\n", argv[i]);
			config_print_usage();
			return 2;
		}
		const char *eq = strchr(a, '=');
		size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
		if ((nlen == 1 && a[0] == 'h') || (nlen == 4 && memcmp(a, "help", 4) == 0)) {
			cfg->show_help = 1;
			return 0;
		}
		const flag_def *f = find_flag(a, nlen);
		if (f == NULL) {
			fprintf(stderr, "flag provided but not defined: -%.*s\n", (int)nlen, a);
			config_print_usage();
			return 2;
		}
		const char *val;
		char shown[128];
		snprintf(shown, sizeof(shown), "%.*s", (int)nlen, a);
		if (eq)
			val = eq + 1;
		else if (f->kind == F_BOOL || f->kind == F_IGNORED_BOOL)
			val = "true";
		else if (i + 1 < argc)
			val = argv[++i];
		else {
			fprintf(stderr, "flag needs an argument: -%s\n", shown);
			config_print_usage();
			return 2;
		}
		int rc = set_flag(cfg, f, val, shown);
		if (rc != 0) {
			config_print_usage();
			return rc;
		}
		given[f - flags] = 1;
	}
	if (i < argc) {
		fprintf(stderr, "error verifying flags, '%s' is not a valid flag. See 'keelson --help'.\n", argv[i]);
		return 1;
	}

	/* etcd: with a configuration file, the file alone decides (flags were checked above). */
	const char *file = cfg->config_file[0] ? cfg->config_file : getenv("ETCD_CONFIG_FILE");
	if (file && file[0]) {
		char *path = strdup(file);
		int rc = path ? config_from_file(cfg, path) : 1;
		free(path);
		if (rc)
			return rc;
		return config_finish(cfg);
	}

	/* Environment variables fill what the command line left unset. */
	for (size_t k = 0; k < NFLAGS; k++) {
		char env[128];
		env_name(flags[k].name, env, sizeof(env));
		const char *v = getenv(env);
		if (v == NULL)
			continue;
		if (given[k]) {
			log_at(LOG_WARN, "ignored environment variable since the command line flag is set",
			       "variable-name", env, NULL);
			continue;
		}
		if (set_flag(cfg, &flags[k], v, flags[k].name) != 0) {
			fprintf(stderr, "invalid value for environment variable %s\n", env);
			return 1;
		}
	}

	return config_finish(cfg);
}

/* The --backup-* flags: checked here (with keelsonutl backup's parser) so that a bad one
 * stops the start, as any invalid flag does. */
static int config_check_backup(config *cfg)
{
	char eb[512];
	backup_plan plan;
	double age = 0;
	const char *dir = cfg->backup_dir ? cfg->backup_dir : "";
	const char *interval = cfg->backup_interval ? cfg->backup_interval : "";
	const char *schedule = cfg->backup_schedule ? cfg->backup_schedule : "";
	const char *max_age = cfg->backup_max_age ? cfg->backup_max_age : "";
	if (dir[0] == '\0') {
		if (interval[0] || schedule[0] || max_age[0] || cfg->backup_retain || cfg->backup_thin ||
		    cfg->backup_compress || cfg->backup_utc) {
			fprintf(stderr, "keelson: the --backup-* flags need --backup-dir\n");
			return 2;
		}
		return 0;
	}
	if (backup_plan_parse(&plan, interval, schedule, cfg->backup_utc, "--backup-", eb, sizeof(eb)) != 0) {
		fprintf(stderr, "keelson: %s\n", eb);
		return 2;
	}
	if (max_age[0] && (backup_parse_duration(max_age, &age) != 0 || age <= 0)) {
		fprintf(stderr, "keelson: invalid --backup-max-age %s (a positive duration)\n", max_age);
		return 2;
	}
	if (cfg->backup_retain > 1000000) {
		fprintf(stderr, "keelson: invalid --backup-retain %llu\n", (unsigned long long)cfg->backup_retain);
		return 2;
	}
	return 0;
}

/* etcd's derived defaults and checks, after flags, environment or the file. */
static int config_finish(config *cfg)
{
	if (cfg->data_dir == NULL || cfg->data_dir[0] == '\0') {
		free(cfg->data_dir);
		size_t len = strlen(cfg->name) + 6;
		cfg->data_dir = malloc(len);
		snprintf(cfg->data_dir, len, "%s.etcd", cfg->name);
	}
	if (cfg->initial_cluster == NULL || cfg->initial_cluster[0] == '\0') {
		/* etcd's default: this member alone, at its advertised peer URLs. */
		size_t len = strlen(cfg->name) + 2;
		for (int u = 0; u < cfg->initial_advertise_peer.n; u++)
			len += strlen(cfg->name) + strlen(cfg->initial_advertise_peer.url[u]) + 2;
		char *ic = calloc(1, len);
		for (int u = 0; u < cfg->initial_advertise_peer.n; u++) {
			if (u > 0)
				strcat(ic, ",");
			strcat(ic, cfg->name);
			strcat(ic, "=");
			strcat(ic, cfg->initial_advertise_peer.url[u]);
		}
		free(cfg->initial_cluster);
		cfg->initial_cluster = ic;
	}
	if (strcmp(cfg->initial_cluster_state, "new") != 0 &&
	    strcmp(cfg->initial_cluster_state, "existing") != 0) {
		fprintf(stderr, "invalid value \"%s\" for flag -initial-cluster-state: invalid value \"%s\"\n",
			cfg->initial_cluster_state, cfg->initial_cluster_state);
		return 2;
	}
	if (cfg->listen_client.n == 0) {
		fprintf(stderr, "keelson: --listen-client-urls must name at least one URL\n");
		return 1;
	}
	return config_check_backup(cfg);
}

void config_free(config *cfg)
{
	for (size_t i = 0; i < NFLAGS; i++) {
		void *field = (char *)cfg + flags[i].offset;
		if (flags[i].kind == F_STRING) {
			free(*(char **)field);
			*(char **)field = NULL;
		} else if (flags[i].kind == F_URLS) {
			config_urls *u = field;
			for (int k = 0; k < u->n; k++)
				free(u->url[k]);
			u->n = 0;
		}
	}
}

/* ---- --config-file: etcd's YAML ---- */

/* The Go type etcd's configYAML gives a key, for its decoding errors. */
static const char *go_type(const flag_def *f)
{
	static const struct {
		const char *name, *type;
	} special[] = {
		{"heartbeat-interval", "uint"}, {"election-timeout", "uint"}, {"max-txn-ops", "uint"},
		{"max-request-bytes", "uint"}, {"quota-backend-bytes", "int64"},
		{"max-concurrent-streams", "uint32"}, {"log-outputs", "[]string"}, {"cipher-suites", "[]string"},
		{"max-snapshots", "uint"}, {"max-wals", "uint"}, {"backend-batch-limit", "int"},
		{"backend-batch-interval", "time.Duration"}, {"experimental-corrupt-check-time", "time.Duration"},
		{"experimental-compaction-batch-limit", "int"}, {"bcrypt-cost", "uint"},
		{"auth-token-ttl", "uint"}, {"experimental-warning-apply-duration", "time.Duration"},
	};
	for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
		if (strcmp(special[i].name, f->name) == 0)
			return special[i].type;
	switch (f->kind) {
	case F_BOOL:
	case F_IGNORED_BOOL:
		return "bool";
	case F_UINT:
		return "uint64";
	case F_DURATION_MS:
		return "time.Duration";
	default:
		return "string";
	}
}

/* What JSON type a YAML node becomes (ghodss/yaml's conversion, YAML 1.1 plain scalars). */
static const char *json_kind(const yaml_node_t *n)
{
	if (n->type == YAML_SEQUENCE_NODE)
		return "array";
	if (n->type == YAML_MAPPING_NODE)
		return "object";
	if (n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return "string";
	const char *v = (const char *)n->data.scalar.value;
	static const char *const bools[] = {"true", "false", "True", "False", "TRUE", "FALSE", "yes", "no",
					    "Yes", "No", "YES", "NO", "on", "off", "On", "Off", "ON", "OFF",
					    "y", "n", "Y", "N"};
	for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++)
		if (strcmp(v, bools[i]) == 0)
			return "bool";
	if (strcmp(v, "~") == 0 || strcmp(v, "null") == 0 || strcmp(v, "Null") == 0 || strcmp(v, "NULL") == 0 ||
	    v[0] == '\0')
		return "null";
	char *end;
	errno = 0;
	strtod(v, &end);
	if (*end == '\0' && end != v)
		return "number";
	return "string";
}

static int yaml_truth(const char *v)
{
	return strchr("tTyY", v[0]) != NULL || strcmp(v, "on") == 0 || strcmp(v, "On") == 0 || strcmp(v, "ON") == 0;
}

static int file_error(const char *msg)
{
	fprintf(stderr, "error verifying flags, %s. See 'keelson --help'.\n", msg);
	return 1;
}

/* One key of the file: the value node n for flag f; struct_path names it in errors. */
static int file_set(config *cfg, yaml_document_t *doc, const flag_def *f, yaml_node_t *n, const char *struct_path)
{
	const char *want = go_type(f), *got = json_kind(n);
	char err[512], val[4096];
	if (strcmp(got, "null") == 0)
		return 0; /* Go's json leaves the default */
	int ok;
	if (strcmp(want, "[]string") == 0)
		ok = strcmp(got, "array") == 0;
	else if (strcmp(want, "string") == 0)
		ok = strcmp(got, "string") == 0;
	else if (strcmp(want, "bool") == 0)
		ok = strcmp(got, "bool") == 0;
	else
		ok = strcmp(got, "number") == 0; /* integers, and time.Duration in nanoseconds */
	if (!ok) {
		snprintf(err, sizeof(err),
			 "error unmarshaling JSON: while decoding JSON: json: cannot unmarshal %s into Go struct field %s of type %s",
			 got, struct_path, want);
		return file_error(err);
	}
	if (n->type == YAML_SEQUENCE_NODE) {
		size_t o = 0;
		val[0] = '\0';
		for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++) {
			yaml_node_t *e = yaml_document_get_node(doc, *it);
			if (e == NULL || e->type != YAML_SCALAR_NODE || strcmp(json_kind(e), "string") != 0) {
				snprintf(err, sizeof(err),
					 "error unmarshaling JSON: while decoding JSON: json: cannot unmarshal %s into Go struct field %s of type string",
					 e ? json_kind(e) : "null", struct_path);
				return file_error(err);
			}
			o += (size_t)snprintf(val + o, o < sizeof(val) ? sizeof(val) - o : 0, "%s%s", o ? "," : "",
					      (const char *)e->data.scalar.value);
		}
		if (o >= sizeof(val))
			return file_error("configuration value too long");
	} else {
		const char *v = (const char *)n->data.scalar.value;
		if (strcmp(want, "bool") == 0)
			v = yaml_truth(v) ? "true" : "false";
		if (strcmp(want, "time.Duration") == 0) {
			/* Go's time.Duration decodes from JSON as nanoseconds */
			snprintf(val, sizeof(val), "%.0fns", strtod(v, NULL));
			v = val;
		}
		if (v != val)
			snprintf(val, sizeof(val), "%s", v);
	}
	if (f->kind == F_URLS) {
		/* etcd checks each URL list as it reads the file, and exits at once */
		for (char *u = val; *u;) {
			size_t len = strcspn(u, ",");
			char one[512], hp[256];
			snprintf(one, sizeof(one), "%.*s", (int)len, u);
			int scheme = strncmp(one, "http://", 7) == 0 || strncmp(one, "https://", 8) == 0 ||
				     strncmp(one, "unix://", 7) == 0 || strncmp(one, "unixs://", 8) == 0;
			if (!scheme || config_url_host_port(one, hp, sizeof(hp)) != 0) {
				fprintf(stderr, scheme ? "unexpected error setting up %s: URL address does not have the form \"host:port\": %s\n"
						       : "unexpected error setting up %s: URL scheme must be http, https, unix, or unixs: %s\n",
					f->name, one);
				return 1;
			}
			u += len;
			if (*u == ',')
				u++;
		}
	}
	if (set_flag(cfg, f, val, f->name) != 0)
		return 1;
	return 0;
}

/* client-transport-security / peer-transport-security: etcd's securityConfig keys, as the
 * flags they stand for. */
static int file_security(config *cfg, yaml_document_t *doc, yaml_node_t *m, const char *section, const char *prefix)
{
	char path[256];
	if (m->type != YAML_MAPPING_NODE) {
		snprintf(path, sizeof(path),
			 "error unmarshaling JSON: while decoding JSON: json: cannot unmarshal %s into Go struct field configYAML.%s of type embed.securityConfig",
			 json_kind(m), section);
		return file_error(path);
	}
	static const char *const keys[] = {"cert-file", "key-file", "client-cert-auth", "trusted-ca-file", "auto-tls"};
	for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
		yaml_node_t *k = yaml_document_get_node(doc, pr->key), *v = yaml_document_get_node(doc, pr->value);
		if (k == NULL || v == NULL || k->type != YAML_SCALAR_NODE)
			continue;
		for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
			if (strcmp((const char *)k->data.scalar.value, keys[i]) != 0)
				continue;
			char flag[64];
			snprintf(flag, sizeof(flag), "%s%s", prefix, keys[i]);
			const flag_def *f = find_flag(flag, strlen(flag));
			snprintf(path, sizeof(path), "securityConfig.%s.%s", section, keys[i]);
			if (f && file_set(cfg, doc, f, v, path) != 0)
				return 1;
		}
		/* etcd 3.5's securityConfig field for --experimental-peer-skip-client-san-verification. */
		if (prefix[0] == 'p' && strcmp((const char *)k->data.scalar.value, "skip-client-san-verification") == 0) {
			const char *name = "experimental-peer-skip-client-san-verification";
			const flag_def *f = find_flag(name, strlen(name));
			snprintf(path, sizeof(path), "securityConfig.%s.skip-client-san-verification", section);
			if (f && file_set(cfg, doc, f, v, path) != 0)
				return 1;
		}
	}
	return 0;
}

static int config_from_file(config *cfg, const char *path)
{
	log_at(LOG_INFO, "loaded server configuration, other configuration command line flags and environment variables will be ignored if provided",
	       "path", path, NULL);
	FILE *fp = fopen(path, "rb");
	if (fp == NULL) {
		char err[4200];
		snprintf(err, sizeof(err), "open %s: %s", path, errno == ENOENT ? "no such file or directory" : strerror(errno));
		return file_error(err);
	}
	/* The file starts from etcd's defaults, not from the command line. */
	char *keep = cfg->config_file;
	cfg->config_file = NULL;
	config_free(cfg);
	memset(cfg, 0, sizeof(*cfg));
	for (size_t i = 0; i < NFLAGS; i++)
		if (flags[i].kind != F_IGNORED_STRING && flags[i].kind != F_IGNORED_BOOL &&
		    strcmp(flags[i].name, "config-file") != 0)
			set_flag(cfg, &flags[i], flags[i].defval, flags[i].name);
	cfg->config_file = keep;

	yaml_parser_t parser;
	yaml_document_t doc;
	int rc = 1, have_doc = 0;
	yaml_parser_initialize(&parser);
	yaml_parser_set_input_file(&parser, fp);
	if (!yaml_parser_load(&parser, &doc)) {
		/* go-yaml's (a port of libyaml) wording: its line is the 0-based problem line,
		 * plus one for scanner errors, else the context's; none if that is 0. */
		unsigned long line = parser.problem_mark.line;
		if (line != 0 && parser.error == YAML_SCANNER_ERROR)
			line++;
		else if (line == 0)
			line = parser.context_mark.line;
		char where[64] = "", err[512];
		if (line)
			snprintf(where, sizeof(where), "line %lu: ", line);
		snprintf(err, sizeof(err), "error converting YAML to JSON: yaml: %s%s", where,
			 parser.problem ? parser.problem : "unknown problem parsing YAML content");
		file_error(err);
		goto done;
	}
	have_doc = 1;
	yaml_node_t *root = yaml_document_get_root_node(&doc);
	if (root == NULL) {
		rc = 0; /* an empty file: the defaults */
		goto done;
	}
	if (root->type != YAML_MAPPING_NODE) {
		char err[256];
		snprintf(err, sizeof(err),
			 "error unmarshaling JSON: while decoding JSON: json: cannot unmarshal %s into Go value of type embed.configYAML",
			 json_kind(root));
		file_error(err);
		goto done;
	}
	for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
		yaml_node_t *k = yaml_document_get_node(&doc, pr->key), *v = yaml_document_get_node(&doc, pr->value);
		if (k == NULL || v == NULL || k->type != YAML_SCALAR_NODE)
			continue;
		const char *key = (const char *)k->data.scalar.value;
		if (strcmp(key, "client-transport-security") == 0 || strcmp(key, "peer-transport-security") == 0) {
			if (file_security(cfg, &doc, v, key, key[0] == 'p' ? "peer-" : "") != 0)
				goto done;
			continue;
		}
		const flag_def *f = find_flag(key, strlen(key));
		/* Go's encoding/json ignores keys it has no field for; so does etcd. Its TLS
		 * settings exist only inside the two sections (embed.Config has no top-level
		 * field for them, nor for the CRL files). */
		static const char *const not_keys[] = {
			"config-file", "version", "cert-file", "key-file", "client-cert-auth", "trusted-ca-file",
			"auto-tls", "client-crl-file", "peer-cert-file", "peer-key-file", "peer-client-cert-auth",
			"peer-trusted-ca-file", "peer-auto-tls", "peer-crl-file",
		};
		for (size_t i = 0; f && i < sizeof(not_keys) / sizeof(not_keys[0]); i++)
			if (strcmp(key, not_keys[i]) == 0)
				f = NULL;
		if (f == NULL)
			continue;
		char spath[128];
		snprintf(spath, sizeof(spath), "configYAML.%s", key);
		if (file_set(cfg, &doc, f, v, spath) != 0)
			goto done;
	}
	rc = 0;
done:
	if (have_doc)
		yaml_document_delete(&doc);
	yaml_parser_delete(&parser);
	fclose(fp);
	return rc;
}
