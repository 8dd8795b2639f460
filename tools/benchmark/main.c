/*
 * main.c - `benchmark`: a load generator for etcd-v3 servers (Keelson, etcd),
 * with the flags of etcd's own benchmark tool where they exist.
 *
 *   benchmark [global flags] put     [--key-size N] [--val-size N] [--key-space-size N] [--sequential-keys]
 *   benchmark [global flags] range   KEY [END] [--consistency l|s] [--limit N]
 *   benchmark [global flags] txn-put [--key-size N] [--val-size N] [--key-space-size N] [--txn-ops N]
 *   benchmark fsync [--dir D] [--count 200] [--block-size 4096]
 *   benchmark [global flags] watch [--watchers W] [--watch-streams S] [--prefixes P] [--rate R]
 *             [--val-size N] [--drain SECONDS] [--ready-file PATH]   (--duration = writing time)
 *   benchmark [global flags] lease-keepalive [--leases L]  (--clients streams over --conns)
 *   benchmark [global flags] txn-mixed [--key-space-size HOT] [--read-fraction F] [--val-size N]
 *             [--consistency l|s]   (CAS txns on hot keys mixed with reads; conflicts counted apart)
 *   benchmark [global flags] apiserver-load [--objects N] [--namespaces N] [--val-size-min A --val-size B]
 *   benchmark [global flags] apiserver [--objects N] [--namespaces N] [--val-size-min A --val-size B]
 *             [--limit 500] [--no-watch]   (the kube-apiserver mix; per-op figures; see apiserver.c)
 *   benchmark [global flags] list PREFIX [--limit N] [--consistency l|s] [--stream]   (one full LIST)
 *   put also takes --key-prefix P (prepended to the binary key).
 *
 * Global flags: --endpoints a:p[,b:p] --conns N --clients N (requests in flight in total)
 *   --total N | --duration SECONDS, --threads N, --timeout SECONDS, --dial-timeout SECONDS,
 *   --label NAME (copied to the report), --json (print only the JSON line).
 * Flags accept "--flag=value" or "--flag value", before or after the subcommand.
 *
 * Prints throughput, latency percentiles of successful requests (p50, p90, p99,
 * p99.9, max) and errors by gRPC status, as text and as one JSON line starting
 * with '{'. Exit status: 0 all requests succeeded, 1 any error, 2 usage.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/absl_mutex.h"
#include "tools/benchmark/bench.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: benchmark [flags] put|range KEY [END]|txn-put|txn-mixed|apiserver-load|apiserver|list PREFIX|\n"
		"       watch|lease-keepalive|fsync [flags]\n"
		"  --endpoints=127.0.0.1:2379[,...]  --conns=1  --clients=1  --threads=auto\n"
		"  --total=10000 | --duration=SECONDS   --timeout=10  --dial-timeout=5\n"
		"  put/txn-put: --key-size=8 --val-size=8 --key-space-size=1 --sequential-keys --txn-ops=1\n"
		"  range:       --consistency=l|s --limit=0\n"
		"  fsync:       --dir=. --count=200 --block-size=4096\n"
		"  watch:       --watchers=100 --watch-streams=10 --prefixes=1 --rate=100 --val-size --drain=10\n"
		"               --ready-file=PATH (created once all watchers exist; puts start when it is removed)\n"
		"               saturation: --ramp=F --step=S (rate x F every S s until delivery falls behind)\n"
		"               --max-p99-ms=1000 (a step keeps up only below this delivery p99)\n"
		"  lease-keepalive: --leases=100 (--clients streams over --conns connections)\n"
		"  txn-mixed:   --key-space-size=1 (hot keys) --read-fraction=0.5 --val-size --consistency=l|s\n"
		"  apiserver-load / apiserver: --objects=10000 --namespaces=20 --val-size-min=1024 --val-size=10240\n"
		"               --limit=500 (LIST page size) --no-watch\n"
		"  list PREFIX: --limit=0 (page size; 0 = one request) --consistency=l|s\n"
		"               --stream (one KV.RangeStream call, etcd 3.7; pages = its messages)\n"
		"  put:         --key-prefix=P\n"
		"  output:      --label=NAME --json (JSON line only)\n");
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *e;
	unsigned long long v = strtoull(s, &e, 10);
	if (!*s || *e)
		return -1;
	*out = v;
	return 0;
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *e;
	long v = strtol(s, &e, 10);
	if (!*s || *e || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

static int parse_dur(const char *s, double *out)
{
	/* seconds, optionally suffixed s / ms / m as etcd's Go durations ("10s") */
	char *e;
	double v = strtod(s, &e);
	if (e == s || v < 0)
		return -1;
	if (!*e || !strcmp(e, "s"))
		*out = v;
	else if (!strcmp(e, "ms"))
		*out = v / 1000;
	else if (!strcmp(e, "m"))
		*out = v * 60;
	else
		return -1;
	return 0;
}

static double pct(const struct bench_result *r, double p)
{
	if (r->n_lat == 0)
		return 0;
	size_t idx = (size_t)ceil(p / 100.0 * (double)r->n_lat);
	if (idx == 0)
		idx = 1;
	if (idx > r->n_lat)
		idx = r->n_lat;
	return r->lat_us[idx - 1] / 1000.0;
}

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c < 0x20)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

static const struct bench_stream_stats *g_ss;

static void report(const struct bench_opts *o, const char *cmd, const struct bench_result *r)
{
	double rps = r->elapsed > 0 ? (double)r->ok / r->elapsed : 0;
	double avg = r->n_lat ? r->lat_sum_us / (double)r->n_lat / 1000.0 : 0;
	double p50 = pct(r, 50), p90 = pct(r, 90), p99 = pct(r, 99), p999 = pct(r, 99.9);
	double max = r->n_lat ? r->lat_us[r->n_lat - 1] / 1000.0 : 0;
	int is_fsync = strcmp(cmd, "fsync") == 0;
	if (!o->quiet) {
		printf("Summary: %s%s%s\n", cmd, o->label ? " / " : "", o->label ? o->label : "");
		if (!is_fsync)
			printf("  Endpoints:   %s%s (%d conns, %d clients, %d threads)\n", o->endpoints[0],
			       o->n_endpoints > 1 ? ",..." : "", o->conns, o->clients, o->threads);
		printf("  Total:       %.4f s\n", r->elapsed);
		printf("  Requests:    %llu ok, %llu errors\n", (unsigned long long)r->ok,
		       (unsigned long long)r->errors);
		printf("  Throughput:  %.1f %s/s\n", rps,
		       is_fsync ? "fdatasync" : !strcmp(cmd, "watch") ? "events delivered" : "req");
		if (g_ss && !strcmp(cmd, "watch"))
			printf("  Watch:       %d watchers on %d streams, %d prefixes, created in %.3f s; %llu puts "
			       "(%llu ok, put p50 %.3f ms p99 %.3f ms) in %.3f s\n"
			       "               events expected %llu, received %llu, missing %llu, duplicates %llu, "
			       "out of order %llu, unexpected %llu, canceled watches %llu\n",
			       o->watchers, o->watch_streams, o->prefixes, g_ss->create_s, (unsigned long long)g_ss->puts,
			       (unsigned long long)g_ss->puts_ok, g_ss->put_p50_ms, g_ss->put_p99_ms, g_ss->write_s,
			       (unsigned long long)g_ss->expected, (unsigned long long)g_ss->events,
			       (unsigned long long)g_ss->missing, (unsigned long long)g_ss->duplicates,
			       (unsigned long long)g_ss->out_of_order, (unsigned long long)g_ss->unexpected,
			       (unsigned long long)g_ss->canceled);
		if (g_ss && !strcmp(cmd, "watch")) {
			printf("  Client CPU:  %.2f s (%.4f s per 1k events)\n", g_ss->client_cpu_s,
			       r->ok ? g_ss->client_cpu_s / (double)r->ok * 1000 : 0);
			for (int k = 0; g_ss->nsteps > 1 && k < g_ss->nsteps; k++) {
				const struct bench_watch_step *st = &g_ss->steps[k];
				printf("  step %2d: %8.1f puts/s for %.1f s: offered %10.0f ev/s, delivered %10.0f ev/s, "
				       "%llu/%llu events, p50 %.1f ms p99 %.1f ms%s\n",
				       k, st->rate, st->seconds, st->seconds > 0 ? (double)st->expected / st->seconds : 0,
				       st->seconds > 0 ? (double)st->received_in_step / st->seconds : 0,
				       (unsigned long long)st->events, (unsigned long long)st->expected, st->p50_ms,
				       st->p99_ms, st->kept_up ? "" : "  (fell behind)");
			}
			if (g_ss->nsteps > 1)
				printf("  Max sustained: %.0f events/s delivered\n", g_ss->max_sustained);
		}
		printf("  Latency ms:  avg %.3f  p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f\n", avg, p50,
		       p90, p99, p999, max);
		if (r->conflicts)
			printf("  Conflicts:   %llu (compare failed: optimistic concurrency lost, not errors)\n",
			       (unsigned long long)r->conflicts);
		for (int k = 0; k < r->n_ops; k++) {
			const struct bench_op_result *op = &r->ops[k];
			struct bench_result tmp = {.lat_us = op->lat_us, .n_lat = op->n_lat};
			printf("  %-12s %8llu ok %6llu conflicts %4llu errors  %9.1f/s  p50 %.3f  p90 %.3f  p99 %.3f  "
			       "p99.9 %.3f  max %.3f ms\n",
			       op->name, (unsigned long long)op->ok, (unsigned long long)op->conflicts,
			       (unsigned long long)op->errors, r->elapsed > 0 ? (double)op->ok / r->elapsed : 0, pct(&tmp, 50),
			       pct(&tmp, 90), pct(&tmp, 99), pct(&tmp, 99.9), op->n_lat ? op->lat_us[op->n_lat - 1] / 1000.0 : 0);
		}
		if (r->errors) {
			printf("  Errors by status:\n");
			for (int c = 1; c < BENCH_NSTATUS; c++)
				if (r->by_status[c])
					printf("    %-20s %llu  (first: %s)\n", bench_status_name(c),
					       (unsigned long long)r->by_status[c], r->first_error[c]);
		}
	}
	printf("{\"tool\":\"keelson-benchmark\",\"workload\":");
	json_str(cmd);
	if (o->label) {
		printf(",\"label\":");
		json_str(o->label);
	}
	if (!is_fsync) {
		printf(",\"endpoints\":");
		json_str(o->endpoints[0]);
		printf(",\"conns\":%d,\"clients\":%d,\"threads\":%d", o->conns, o->clients, o->threads);
		if (g_ss && !strcmp(cmd, "watch"))
			printf(",\"watchers\":%d,\"watch_streams\":%d,\"prefixes\":%d,\"rate\":%.1f,\"val_size\":%d"
			       ",\"created\":%d,\"create_s\":%.4f,\"write_s\":%.4f,\"puts\":%llu,\"puts_ok\":%llu"
			       ",\"put_p50_ms\":%.4f,\"put_p99_ms\":%.4f,\"expected\":%llu,\"events\":%llu,\"missing\":%llu"
			       ",\"duplicates\":%llu,\"out_of_order\":%llu,\"unexpected\":%llu,\"canceled\":%llu",
			       o->watchers, o->watch_streams, o->prefixes, o->rate, o->val_size, g_ss->created, g_ss->create_s,
			       g_ss->write_s, (unsigned long long)g_ss->puts, (unsigned long long)g_ss->puts_ok,
			       g_ss->put_p50_ms, g_ss->put_p99_ms, (unsigned long long)g_ss->expected,
			       (unsigned long long)g_ss->events, (unsigned long long)g_ss->missing,
			       (unsigned long long)g_ss->duplicates, (unsigned long long)g_ss->out_of_order,
			       (unsigned long long)g_ss->unexpected, (unsigned long long)g_ss->canceled);
		if (g_ss && !strcmp(cmd, "watch")) {
			printf(",\"client_cpu_s\":%.3f,\"ramp\":%.3f,\"max_p99_ms\":%.1f,\"max_sustained\":%.1f,\"steps\":[",
			       g_ss->client_cpu_s, o->ramp, o->max_p99_ms, g_ss->max_sustained);
			for (int k = 0; k < g_ss->nsteps; k++) {
				const struct bench_watch_step *st = &g_ss->steps[k];
				printf("%s{\"rate\":%.1f,\"s\":%.3f,\"puts_ok\":%llu,\"expected\":%llu,\"events\":%llu,"
				       "\"received_in_step\":%llu,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"kept_up\":%d}",
				       k ? "," : "", st->rate, st->seconds, (unsigned long long)st->puts_ok,
				       (unsigned long long)st->expected, (unsigned long long)st->events,
				       (unsigned long long)st->received_in_step, st->p50_ms, st->p99_ms, st->kept_up);
			}
			printf("]");
		} else if (!strcmp(cmd, "lease-keepalive"))
			printf(",\"leases\":%d", o->leases);
		else if (!strcmp(cmd, "range") || !strcmp(cmd, "list"))
			printf(",\"consistency\":\"%s\",\"limit\":%lld", o->serializable ? "s" : "l",
			       (long long)o->limit);
		else
			printf(",\"key_size\":%d,\"val_size\":%d,\"key_space_size\":%llu", o->key_size, o->val_size,
			       (unsigned long long)o->key_space);
	} else {
		printf(",\"block_size\":%d", o->block_size);
	}
	printf(",\"elapsed_s\":%.4f,\"ok\":%llu,\"errors\":%llu,\"rps\":%.1f", r->elapsed, (unsigned long long)r->ok,
	       (unsigned long long)r->errors, rps);
	printf(",\"lat_ms\":{\"avg\":%.4f,\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f,\"p99_9\":%.4f,\"max\":%.4f}", avg,
	       p50, p90, p99, p999, max);
	if (r->conflicts || r->n_ops)
		printf(",\"conflicts\":%llu", (unsigned long long)r->conflicts);
	printf("%s", r->extra_json);
	if (r->n_ops) {
		printf(",\"ops\":{");
		for (int k = 0; k < r->n_ops; k++) {
			const struct bench_op_result *op = &r->ops[k];
			struct bench_result tmp = {.lat_us = op->lat_us, .n_lat = op->n_lat};
			printf("%s\"%s\":{\"ok\":%llu,\"conflicts\":%llu,\"errors\":%llu,\"rps\":%.1f,\"lat_ms\":{\"avg\":%.4f,"
			       "\"p50\":%.4f,\"p90\":%.4f,\"p99\":%.4f,\"p99_9\":%.4f,\"max\":%.4f}}",
			       k ? "," : "", op->name, (unsigned long long)op->ok, (unsigned long long)op->conflicts,
			       (unsigned long long)op->errors, r->elapsed > 0 ? (double)op->ok / r->elapsed : 0,
			       op->n_lat ? op->lat_sum_us / (double)op->n_lat / 1000.0 : 0, pct(&tmp, 50), pct(&tmp, 90),
			       pct(&tmp, 99), pct(&tmp, 99.9), op->n_lat ? op->lat_us[op->n_lat - 1] / 1000.0 : 0);
		}
		printf("}");
	}
	printf(",\"errors_by_status\":{");
	int first = 1;
	for (int c = 1; c < BENCH_NSTATUS; c++)
		if (r->by_status[c]) {
			printf("%s\"%s\":%llu", first ? "" : ",", bench_status_name(c),
			       (unsigned long long)r->by_status[c]);
			first = 0;
		}
	printf("}");
	if (r->errors) {
		for (int c = 1; c < BENCH_NSTATUS; c++)
			if (r->by_status[c]) {
				printf(",\"first_error\":");
				json_str(r->first_error[c]);
				break;
			}
	}
	printf("}\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	/* The load generator shares the cores with the servers it measures: no debug-mode
	 * lock-order checks in its gRPC either. */
	api_absl_deadlock_detection_off();
	struct bench_opts o = {
		.conns = 1,
		.clients = 1,
		.dial_timeout = 5,
		.timeout = 10,
		.total = 10000,
		.key_size = 8,
		.val_size = 8,
		.key_space = 1,
		.txn_ops = 1,
		.dir = ".",
		.count = 200,
		.block_size = 4096,
		.watchers = 100,
		.watch_streams = 10,
		.prefixes = 1,
		.rate = 100,
		.drain = 10,
		.ramp = 1,
		.max_p99_ms = 1000,
		.leases = 100,
		.read_fraction = 0.5,
		.val_size_min = -1,
		.objects = 10000,
		.namespaces = 20,
		.watch_resources = 1,
	};
	char endpoints_buf[1024] = "127.0.0.1:2379";
	const char *cmd = NULL;
	const char *pos[4];
	int npos = 0, total_set = 0;

	for (int i = 1; i < argc; i++) {
		char *a = argv[i];
		if (strncmp(a, "--", 2) != 0 || !a[2]) {
			if (!cmd)
				cmd = a;
			else if (npos < 4)
				pos[npos++] = a;
			else
				goto bad;
			continue;
		}
		char name[64];
		const char *val = NULL;
		char *eq = strchr(a, '=');
		size_t nl = eq ? (size_t)(eq - a) : strlen(a);
		if (nl >= sizeof name)
			goto bad;
		memcpy(name, a, nl);
		name[nl] = 0;
		if (eq)
			val = eq + 1;
		/* boolean flags */
		if (!strcmp(name, "--sequential-keys") || !strcmp(name, "--json") || !strcmp(name, "--help") ||
		    !strcmp(name, "--no-watch") || !strcmp(name, "--stream")) {
			int b = !val || !strcmp(val, "true") || !strcmp(val, "1");
			if (!strcmp(name, "--help")) {
				usage(stdout);
				return 0;
			}
			if (!strcmp(name, "--json"))
				o.quiet = b;
			else if (!strcmp(name, "--no-watch"))
				o.watch_resources = !b;
			else if (!strcmp(name, "--stream"))
				o.stream = b;
			else
				o.sequential = b;
			continue;
		}
		if (!val) {
			if (i + 1 >= argc)
				goto bad;
			val = argv[++i];
		}
		int ok = 0;
		if (!strcmp(name, "--endpoints")) {
			ok = strlen(val) < sizeof endpoints_buf;
			if (ok)
				strcpy(endpoints_buf, val);
		} else if (!strcmp(name, "--conns")) {
			ok = !parse_int(val, 1, 4096, &o.conns);
		} else if (!strcmp(name, "--clients")) {
			ok = !parse_int(val, 1, 100000, &o.clients);
		} else if (!strcmp(name, "--threads")) {
			ok = !parse_int(val, 0, 256, &o.threads);
		} else if (!strcmp(name, "--total")) {
			ok = !parse_u64(val, &o.total);
			total_set = 1;
		} else if (!strcmp(name, "--duration")) {
			ok = !parse_dur(val, &o.duration);
		} else if (!strcmp(name, "--timeout")) {
			ok = !parse_dur(val, &o.timeout) && o.timeout > 0;
		} else if (!strcmp(name, "--dial-timeout")) {
			ok = !parse_dur(val, &o.dial_timeout) && o.dial_timeout > 0;
		} else if (!strcmp(name, "--key-size")) {
			ok = !parse_int(val, 1, 1 << 20, &o.key_size);
		} else if (!strcmp(name, "--val-size")) {
			ok = !parse_int(val, 0, 64 << 20, &o.val_size);
		} else if (!strcmp(name, "--key-space-size")) {
			ok = !parse_u64(val, &o.key_space) && o.key_space > 0;
		} else if (!strcmp(name, "--txn-ops")) {
			ok = !parse_int(val, 1, 1024, &o.txn_ops);
		} else if (!strcmp(name, "--consistency")) {
			ok = !strcmp(val, "l") || !strcmp(val, "s");
			o.serializable = !strcmp(val, "s");
		} else if (!strcmp(name, "--limit")) {
			uint64_t l;
			ok = !parse_u64(val, &l);
			o.limit = (int64_t)l;
		} else if (!strcmp(name, "--dir")) {
			o.dir = val;
			ok = 1;
		} else if (!strcmp(name, "--count")) {
			ok = !parse_int(val, 1, 1000000, &o.count);
		} else if (!strcmp(name, "--block-size")) {
			ok = !parse_int(val, 1, 64 << 20, &o.block_size);
		} else if (!strcmp(name, "--watchers")) {
			ok = !parse_int(val, 1, 10000000, &o.watchers);
		} else if (!strcmp(name, "--watch-streams")) {
			ok = !parse_int(val, 1, 100000, &o.watch_streams);
		} else if (!strcmp(name, "--prefixes")) {
			ok = !parse_int(val, 1, 99999, &o.prefixes);
		} else if (!strcmp(name, "--rate")) {
			o.rate = strtod(val, NULL);
			ok = o.rate > 0;
		} else if (!strcmp(name, "--ramp")) {
			o.ramp = strtod(val, NULL);
			ok = o.ramp >= 1 && o.ramp <= 100;
		} else if (!strcmp(name, "--step")) {
			ok = !parse_dur(val, &o.step) && o.step > 0;
		} else if (!strcmp(name, "--max-p99-ms")) {
			o.max_p99_ms = strtod(val, NULL);
			ok = o.max_p99_ms > 0;
		} else if (!strcmp(name, "--drain")) {
			ok = !parse_dur(val, &o.drain);
		} else if (!strcmp(name, "--ready-file")) {
			o.ready_file = val;
			ok = 1;
		} else if (!strcmp(name, "--leases")) {
			ok = !parse_int(val, 1, 10000000, &o.leases);
		} else if (!strcmp(name, "--key-prefix")) {
			o.key_prefix = val;
			ok = strlen(val) < 256;
		} else if (!strcmp(name, "--read-fraction")) {
			char *e;
			o.read_fraction = strtod(val, &e);
			ok = *val && !*e && o.read_fraction >= 0 && o.read_fraction <= 1;
		} else if (!strcmp(name, "--val-size-min")) {
			ok = !parse_int(val, 0, 64 << 20, &o.val_size_min);
		} else if (!strcmp(name, "--objects")) {
			ok = !parse_int(val, 1, 100000000, &o.objects);
		} else if (!strcmp(name, "--namespaces")) {
			ok = !parse_int(val, 1, 999, &o.namespaces);
		} else if (!strcmp(name, "--label")) {
			o.label = val;
			ok = 1;
		}
		if (!ok) {
			fprintf(stderr, "benchmark: bad or unknown flag %s\n", a);
			goto bad;
		}
	}
	if (!cmd)
		goto bad;
	if (o.duration > 0 && !total_set)
		o.total = 0;
	if (o.total == 0 && o.duration <= 0) {
		fprintf(stderr, "benchmark: need --total or --duration\n");
		goto bad;
	}

	struct bench_result res;
	if (!strcmp(cmd, "fsync")) {
		if (npos)
			goto bad;
		int rc = bench_fsync(&o, &res);
		if (res.setup_failed) {
			fprintf(stderr, "benchmark: %s\n", res.setup_error);
			return 1;
		}
		report(&o, cmd, &res);
		free(res.lat_us);
		return rc == 0 ? 0 : 1;
	}

	if (!strcmp(cmd, "list")) {
		if (npos != 1)
			goto bad;
		for (char *p = endpoints_buf, *save = NULL, *tok; (tok = strtok_r(p, ",", &save)); p = NULL) {
			if (o.n_endpoints == BENCH_MAX_ENDPOINTS)
				goto bad;
			o.endpoints[o.n_endpoints++] = tok;
		}
		if (!o.n_endpoints)
			goto bad;
		int rc = bench_list(&o, pos[0], &res);
		if (res.setup_failed) {
			fprintf(stderr, "benchmark: %s\n", res.setup_error);
			return 1;
		}
		report(&o, cmd, &res);
		free(res.lat_us);
		return rc == 0 && !res.errors ? 0 : 1;
	}

	int is_watch = !strcmp(cmd, "watch");
	if (is_watch || !strcmp(cmd, "lease-keepalive")) {
		if (npos)
			goto bad;
		for (char *p = endpoints_buf, *save = NULL, *tok; (tok = strtok_r(p, ",", &save)); p = NULL) {
			if (o.n_endpoints == BENCH_MAX_ENDPOINTS)
				goto bad;
			o.endpoints[o.n_endpoints++] = tok;
		}
		if (!o.n_endpoints)
			goto bad;
		if (is_watch && o.duration <= 0) {
			fprintf(stderr, "benchmark: watch needs --duration (writing time)\n");
			goto bad;
		}
		if (o.watch_streams > o.watchers)
			o.watch_streams = o.watchers;
		if (o.threads == 0) {
			long n = sysconf(_SC_NPROCESSORS_ONLN);
			o.threads = n > 0 ? (int)n : 1;
		}
		static struct bench_stream_stats ss;
		if (bench_run_stream(&o, is_watch, &res, &ss) != 0) {
			fprintf(stderr, "benchmark: %s\n", res.setup_error);
			return 1;
		}
		g_ss = is_watch ? &ss : NULL;
		report(&o, cmd, &res);
		free(res.lat_us);
		if (is_watch && (ss.missing || ss.duplicates || ss.out_of_order || ss.unexpected || ss.canceled))
			return 1;
		return res.errors ? 1 : 0;
	}

	const struct bench_workload *w = bench_workload_find(cmd);
	if (!w) {
		fprintf(stderr, "benchmark: unknown command %s\n", cmd);
		goto bad;
	}
	if (!strcmp(cmd, "range")) {
		if (npos < 1 || npos > 2)
			goto bad;
		o.range_key = pos[0];
		o.range_end = npos == 2 ? pos[1] : NULL;
	} else if (npos) {
		goto bad;
	}
	for (char *p = endpoints_buf, *save = NULL, *tok; (tok = strtok_r(p, ",", &save)); p = NULL) {
		if (o.n_endpoints == BENCH_MAX_ENDPOINTS)
			goto bad;
		o.endpoints[o.n_endpoints++] = tok;
	}
	if (!o.n_endpoints)
		goto bad;
	if (o.threads == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		o.threads = n > 0 ? (int)n : 1;
	}
	if (o.threads > o.clients)
		o.threads = o.clients;

	if (bench_run(&o, w, &res) != 0) {
		fprintf(stderr, "benchmark: %s\n", res.setup_error);
		return 1;
	}
	report(&o, cmd, &res);
	free(res.lat_us);
	for (int k = 0; k < res.n_ops; k++)
		free(res.ops[k].lat_us);
	return res.errors ? 1 : 0;
bad:
	usage(stderr);
	return 2;
}
