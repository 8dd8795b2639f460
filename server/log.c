/*
 * log.c - log lines shaped like etcd's: zap's JSON ("--logger=zap") or capnslog's text
 * (etcd 3.4's default). Lines go to stderr, one write each, so threads never interleave.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "server/server.h"

static int log_json;
static log_level log_min = LOG_INFO;

void log_setup(const char *logger, const char *level)
{
	log_json = logger != NULL && strcmp(logger, "zap") == 0;
	if (level == NULL)
		return;
	if (strcmp(level, "debug") == 0)
		log_min = LOG_DEBUG;
	else if (strcmp(level, "warn") == 0)
		log_min = LOG_WARN;
	else if (strcmp(level, "error") == 0)
		log_min = LOG_ERROR;
	else if (strcmp(level, "panic") == 0 || strcmp(level, "fatal") == 0)
		log_min = LOG_FATAL;
	else
		log_min = LOG_INFO;
}

/* Appends s to buf as a JSON string body (without quotes). */
static size_t json_escape(char *buf, size_t cap, size_t n, const char *s)
{
	for (; *s && n + 7 < cap; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			buf[n++] = '\\';
			buf[n++] = (char)c;
		} else if (c < 0x20) {
			n += snprintf(buf + n, cap - n, "\\u%04x", c);
		} else {
			buf[n++] = (char)c;
		}
	}
	return n;
}

void log_at(log_level lvl, const char *msg, ...)
{
	static const char *const names[] = {"debug", "info", "warn", "error", "fatal"};
	static const char letters[] = {'D', 'I', 'W', 'E', 'C'};
	if (lvl < log_min)
		return;
	char buf[4096];
	size_t n = 0, cap = sizeof(buf) - 2;
	struct timeval tv;
	struct tm tm;
	gettimeofday(&tv, NULL);
	localtime_r(&tv.tv_sec, &tm);
	va_list ap;
	va_start(ap, msg);
	if (log_json) {
		char ts[64];
		strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
		n += snprintf(buf + n, cap - n, "{\"level\":\"%s\",\"ts\":\"%s.%06ldZ\",\"caller\":\"keelson\",\"msg\":\"",
			      names[lvl], ts, (long)tv.tv_usec);
		n = json_escape(buf, cap, n, msg);
		if (n < cap)
			buf[n++] = '"';
		const char *k;
		while ((k = va_arg(ap, const char *)) != NULL) {
			const char *v = va_arg(ap, const char *);
			n += snprintf(buf + n, cap - n, ",\"");
			n = json_escape(buf, cap, n, k);
			n += snprintf(buf + n, cap > n ? cap - n : 0, "\":\"");
			n = json_escape(buf, cap, n, v ? v : "");
			if (n < cap)
				buf[n++] = '"';
		}
		if (n < cap)
			buf[n++] = '}';
	} else {
		char ts[64];
		strftime(ts, sizeof(ts), "%Y-%m-%d %H:%M:%S", &tm);
		n += snprintf(buf + n, cap - n, "%s.%06ld %c | keelson: %s", ts, (long)tv.tv_usec, letters[lvl], msg);
		const char *k;
		while ((k = va_arg(ap, const char *)) != NULL && n < cap) {
			const char *v = va_arg(ap, const char *);
			n += snprintf(buf + n, cap - n, " %s=%s", k, v ? v : "");
		}
	}
	va_end(ap);
	if (n > cap)
		n = cap;
	buf[n++] = '\n';
	ssize_t w = write(2, buf, n);
	(void)w;
}
