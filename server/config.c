/*
 * config.c - etcd's command line: the same flags, ETCD_* environment variables and defaults.
 *
 * Flags follow Go's flag package, which etcd uses: "-f" and "--f" are the same, values come
 * as "--f=v" or "--f v", booleans only as "--f" or "--f=true|false". A flag given on the
 * command line wins over its environment variable.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
	{"heartbeat-interval", F_UINT, "100", OFF(heartbeat_ms), "Time (in milliseconds) of a heartbeat interval."},
	{"election-timeout", F_UINT, "1000", OFF(election_ms), "Time (in milliseconds) for an election to timeout."},
	{"initial-election-tick-advance", F_IGNORED_BOOL, "true", 0, "Whether to fast-forward initial election ticks on boot for faster election."},
	{"listen-peer-urls", F_URLS, "http://localhost:2380", OFF(listen_peer), "List of URLs to listen on for peer traffic."},
	{"listen-client-urls", F_URLS, "http://localhost:2379", OFF(listen_client), "List of URLs to listen on for client traffic."},
	{"max-snapshots", F_IGNORED_STRING, "5", 0, "Maximum number of snapshot files to retain (0 is unlimited)."},
	{"max-wals", F_IGNORED_STRING, "5", 0, "Maximum number of wal files to retain (0 is unlimited)."},
	{"quota-backend-bytes", F_UINT, "0", OFF(quota_backend_bytes), "Raise alarms when backend size exceeds the given quota (0 defaults to low space quota)."},
	{"backend-batch-interval", F_IGNORED_STRING, "", 0, "BackendBatchInterval is the maximum time before commit the backend transaction."},
	{"backend-batch-limit", F_IGNORED_STRING, "0", 0, "BackendBatchLimit is the maximum operations before commit the backend transaction."},
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
	{"client-crl-file", F_IGNORED_STRING, "", 0, "Path to the client certificate revocation list file."},
	{"client-cert-allowed-hostname", F_IGNORED_STRING, "", 0, "Allowed TLS hostname for client cert authentication."},
	{"trusted-ca-file", F_STRING, "", OFF(trusted_ca_file), "Path to the client server TLS trusted CA cert file."},
	{"auto-tls", F_IGNORED_BOOL, "false", 0, "Client TLS using generated certificates."},
	{"peer-cert-file", F_IGNORED_STRING, "", 0, "Path to the peer server TLS cert file."},
	{"peer-key-file", F_IGNORED_STRING, "", 0, "Path to the peer server TLS key file."},
	{"peer-client-cert-auth", F_IGNORED_BOOL, "false", 0, "Enable peer client cert authentication."},
	{"peer-trusted-ca-file", F_IGNORED_STRING, "", 0, "Path to the peer server TLS trusted CA file."},
	{"peer-cert-allowed-cn", F_IGNORED_STRING, "", 0, "Allowed CN for inter peer authentication."},
	{"peer-cert-allowed-hostname", F_IGNORED_STRING, "", 0, "Allowed TLS hostname for inter peer authentication."},
	{"peer-auto-tls", F_IGNORED_BOOL, "false", 0, "Peer TLS using self-generated certificates if --peer-key-file and --peer-cert-file are not provided."},
	{"peer-crl-file", F_IGNORED_STRING, "", 0, "Path to the peer certificate revocation list file."},
	{"cipher-suites", F_IGNORED_STRING, "", 0, "Comma-separated list of supported TLS cipher suites between client/server and peers."},
	{"cors", F_IGNORED_STRING, "*", 0, "Comma-separated whitelist of origins for CORS, or cross-origin resource sharing."},
	{"host-whitelist", F_IGNORED_STRING, "*", 0, "Acceptable hostnames from HTTP client requests."},
	{"auth-token", F_IGNORED_STRING, "simple", 0, "Specify a v3 authentication token type and its options ('simple' or 'jwt')."},
	{"bcrypt-cost", F_IGNORED_STRING, "10", 0, "Specify the cost / strength of the bcrypt algorithm for hashing auth passwords."},
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
	{"experimental-initial-corrupt-check", F_IGNORED_BOOL, "false", 0, "Enable to check data corruption before serving any client/peer traffic."},
	{"experimental-corrupt-check-time", F_IGNORED_STRING, "0s", 0, "Duration of time between cluster corruption check passes."},
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
	{"config-file", F_IGNORED_STRING, "", 0, "Path to the server configuration file (not supported yet)."},
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
	return 0;
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
