/*
 * powerloss.c - an LD_PRELOAD shim that records, for a later simulated power loss, every
 * change a process makes to the files under one directory that is not yet durable.
 *
 *   LD_PRELOAD=.../libpowerloss.so POWERLOSS_DIR=/data POWERLOSS_JOURNAL=/tmp/j keelson ...
 *   kill -9 ...; tests/fault/powerloss_apply.py --journal /tmp/j --seed 7
 *
 * A SIGKILL leaves everything the process wrote in the page cache, so it never shows a
 * missing fsync. This shim keeps an undo journal instead: before each write to a regular
 * file under POWERLOSS_DIR it appends the bytes the write overwrites (and the file's size);
 * after each fsync/fdatasync/sync_file_range(WAIT_AFTER) it appends a sync mark, which
 * makes that file's earlier records durable. powerloss_apply.py then rolls back, page by
 * page, what a power loss may lose (tests/fault/README.md).
 *
 * Recorded (a record is appended BEFORE the change it describes, so a kill between the two
 * only undoes a change that never happened):
 *   W  pwrite, pwrite64, pwritev, pwritev64, write, writev: offset, old bytes, old size
 *   D  the same through a descriptor opened O_DSYNC/O_SYNC: durable at once (LMDB writes its
 *      meta page that way); only the range, no old bytes
 *   T  ftruncate, fallocate, posix_fallocate: old size and the bytes a shrink cuts off
 *   S  fsync, fdatasync, sync_file_range with SYNC_FILE_RANGE_WAIT_AFTER of a file or a
 *      directory: the journal position before the call (records after it stay undoable)
 *   C  open/openat/creat creating a file; R rename/renameat/renameat2; U unlink/unlinkat:
 *      directory entries, durable only after an fsync of their directory. The file a rename
 *      replaces or an unlink removes is kept as a hard link in POWERLOSS_JOURNAL.stash/, so
 *      that the entry can be put back.
 *   M  mmap of a file with PROT_WRITE and MAP_SHARED: writes through it are not modelled
 *      (Keelson does not use MDB_WRITEMAP; LMDB maps its lock.mdb so), so the record only
 *      lets powerloss_apply.py refuse a journal whose power loss it cannot simulate.
 * Not modelled either: mkdir/rmdir, copy_file_range/sendfile.
 *
 * POWERLOSS_SYNC_DELAY_MS=N sleeps N ms before each sync (of anything: the shim is
 * active), which widens the windows in which written data is not yet durable.
 * POWERLOSS_DROP_SYNCS=1 records no sync at all (and O_DSYNC writes as plain ones): the
 * journal then describes a process that never syncs, which the checks must catch (the
 * self-test of test_powerloss.py).
 *
 * Files are named by device and inode (stable across renames) and, for information, by path.
 * The journal is written with plain write() and never synced: the test kills the process,
 * not the machine. Without POWERLOSS_DIR the shim does nothing at all.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "tests/fault/real.h"

REAL(fsync, int, int)
REAL(fdatasync, int, int)
REAL(sync_file_range, int, int, off64_t, off64_t, unsigned int)
REAL(pwrite, ssize_t, int, const void *, size_t, off_t)
REAL(pwrite64, ssize_t, int, const void *, size_t, off64_t)
REAL(pwritev, ssize_t, int, const struct iovec *, int, off_t)
REAL(pwritev64, ssize_t, int, const struct iovec *, int, off64_t)
REAL(writev, ssize_t, int, const struct iovec *, int)
REAL(write, ssize_t, int, const void *, size_t)
REAL(ftruncate, int, int, off_t)
REAL(ftruncate64, int, int, off64_t)
REAL(fallocate, int, int, int, off_t, off_t)
REAL(fallocate64, int, int, int, off64_t, off64_t)
REAL(posix_fallocate, int, int, off_t, off_t)
REAL(posix_fallocate64, int, int, off64_t, off64_t)
REAL(open, int, const char *, int, ...)
REAL(open64, int, const char *, int, ...)
REAL(openat, int, int, const char *, int, ...)
REAL(openat64, int, int, const char *, int, ...)
REAL(creat, int, const char *, mode_t)
REAL(rename, int, const char *, const char *)
REAL(renameat, int, int, const char *, int, const char *)
REAL(renameat2, int, int, const char *, int, const char *, unsigned int)
REAL(unlink, int, const char *)
REAL(unlinkat, int, int, const char *, int)
REAL(mmap, void *, void *, size_t, int, int, int, off_t)
REAL(mmap64, void *, void *, size_t, int, int, int, off64_t)

/* One journal record, followed by path, path2 and data (the lengths say how long). */
struct rec {
	char type;       /* W D T S C R U X M */
	char pad[7];
	uint64_t seq;    /* the record's position: 1, 2, ... */
	uint64_t dev, ino;         /* the file (W D T S) or the directory (C R U: of path) */
	uint64_t dev2, ino2;       /* R: the directory of path2 */
	int64_t off;               /* W D: offset written; T: new size; S: sync covers seq < off */
	int64_t len;               /* W D: bytes written */
	int64_t old_size;          /* W T: the file's size before */
	uint32_t path_len, path2_len;
	uint64_t data_len;         /* W: old bytes (up to EOF); T: cut-off tail; R U: 0 */
	uint64_t flags;            /* R: 1 if path2 existed (stashed as <journal>.stash/<seq>) */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int jfd = -1;        /* the journal, opened on first use; -2: cannot be opened */
static uint64_t next_seq = 1;
static char dir[PATH_MAX];  /* POWERLOSS_DIR, resolved, no trailing slash */
static size_t dir_len;
static int state;           /* 0 not initialised, 1 active, -1 off */
static int drop_syncs;      /* POWERLOSS_DROP_SYNCS=1: as if the process never synced */
static int sync_delay_ms;   /* POWERLOSS_SYNC_DELAY_MS: sleep before each sync (wider windows) */

static int active(void)
{
	int st = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
	if (st != 0)
		return st > 0;
	pthread_mutex_lock(&mu);
	if (state == 0) {
		const char *d = getenv("POWERLOSS_DIR"), *j = getenv("POWERLOSS_JOURNAL");
		int next = -1;
		drop_syncs = getenv("POWERLOSS_DROP_SYNCS") != NULL &&
			     strcmp(getenv("POWERLOSS_DROP_SYNCS"), "1") == 0;
		if (getenv("POWERLOSS_SYNC_DELAY_MS"))
			sync_delay_ms = atoi(getenv("POWERLOSS_SYNC_DELAY_MS"));
		if (d && (j == NULL || realpath(d, dir) == NULL)) {
			/* asked for but unable to track: stop rather than pass vacuously */
			fprintf(stderr, "powerloss: POWERLOSS_DIR %s must exist and POWERLOSS_JOURNAL "
					"be set\n", d);
			abort();
		}
		if (d) {
			dir_len = strlen(dir);
			/* one journal per process: its records are numbered from 1 */
			jfd = get_open()(j, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
			if (jfd < 0) {
				fprintf(stderr, "powerloss: cannot create journal %s: %s\n", j,
					strerror(errno));
				abort(); /* running untracked would make the test pass vacuously */
			}
			next = 1;
		}
		__atomic_store_n(&state, next, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&mu);
	return state > 0;
}

static int under_dir(const char *path)
{
	return strncmp(path, dir, dir_len) == 0 && (path[dir_len] == '/' || path[dir_len] == '\0');
}

/* The path of fd if it is a regular file or a directory under the directory, else -1. */
static int fd_path(int fd, char *out, struct stat *st)
{
	char link[64];
	if (fd < 0 || fstat(fd, st) != 0 || !(S_ISREG(st->st_mode) || S_ISDIR(st->st_mode)))
		return -1;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, out, PATH_MAX - 1);
	if (n <= 0)
		return -1;
	out[n] = '\0';
	return under_dir(out) ? 0 : -1;
}

/* The absolute path of (dirfd, path), made without following the last component. */
static int abs_path(int dirfd, const char *path, char *out)
{
	char base[PATH_MAX];
	if (path[0] == '/') {
		base[0] = '\0';
	} else if (dirfd == AT_FDCWD) {
		if (getcwd(base, sizeof(base)) == NULL)
			return -1;
	} else {
		char link[64];
		snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
		ssize_t n = readlink(link, base, sizeof(base) - 1);
		if (n <= 0)
			return -1;
		base[n] = '\0';
	}
	if (snprintf(out, PATH_MAX, "%s%s%s", base, base[0] ? "/" : "", path) >= PATH_MAX)
		return -1;
	/* resolve the directory part (the data dir may be reached through a symlink) */
	char *slash = strrchr(out, '/');
	char d[PATH_MAX], r[PATH_MAX];
	size_t dl = (size_t)(slash - out);
	memcpy(d, out, dl);
	d[dl] = '\0';
	if (realpath(dl ? d : "/", r) == NULL)
		return -1;
	char last[PATH_MAX];
	snprintf(last, sizeof(last), "%s", slash + 1);
	if (snprintf(out, PATH_MAX, "%s/%s", r, last) >= PATH_MAX)
		return -1;
	return 0;
}

static int parent_id(const char *path, uint64_t *dev, uint64_t *ino)
{
	char d[PATH_MAX];
	snprintf(d, sizeof(d), "%s", path);
	char *slash = strrchr(d, '/');
	if (slash == NULL)
		return -1;
	*slash = '\0';
	struct stat st;
	if (stat(d[0] ? d : "/", &st) != 0)
		return -1;
	*dev = st.st_dev;
	*ino = st.st_ino;
	return 0;
}

static void write_all(const void *p, size_t n)
{
	const char *c = p;
	while (n > 0) {
		ssize_t w = get_write()(jfd, c, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			fprintf(stderr, "powerloss: journal write failed: %s\n", strerror(errno));
			abort(); /* a journal with a hole would give a wrong power loss: stop here */
		}
		c += w;
		n -= (size_t)w;
	}
}

/* Appends r (its seq set here) and its strings; mu held. */
static void append(struct rec *r, const char *path, const char *path2, const void *data)
{
	r->seq = next_seq++;
	r->path_len = path ? (uint32_t)strlen(path) : 0;
	r->path2_len = path2 ? (uint32_t)strlen(path2) : 0;
	write_all(r, sizeof(*r));
	if (r->path_len)
		write_all(path, r->path_len);
	if (r->path2_len)
		write_all(path2, r->path2_len);
	if (r->data_len)
		write_all(data, r->data_len);
}

/* Reads up to n bytes of fd's file at off (fd may be write-only: then through /proc). */
static ssize_t read_old(int fd, void *buf, size_t n, off_t off)
{
	ssize_t got = pread(fd, buf, n, off);
	if (got >= 0 || errno != EBADF)
		return got;
	char link[64];
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	int rfd = get_open()(link, O_RDONLY | O_CLOEXEC);
	if (rfd < 0)
		return -1;
	got = pread(rfd, buf, n, off);
	close(rfd);
	return got;
}

/* Before a write of n bytes at off (-1: the descriptor's position) to fd. */
static void before_write(int fd, size_t n, off_t off)
{
	if (!active())
		return;
	int saved = errno;
	char path[PATH_MAX];
	struct stat st;
	if (fd_path(fd, path, &st) != 0 || !S_ISREG(st.st_mode)) {
		errno = saved;
		return;
	}
	int fl = fcntl(fd, F_GETFL);
	if (off < 0)
		off = (fl >= 0 && (fl & O_APPEND)) ? st.st_size : lseek(fd, 0, SEEK_CUR);
	struct rec r = {0};
	r.dev = st.st_dev;
	r.ino = st.st_ino;
	r.off = off;
	r.len = (int64_t)n;
	r.old_size = st.st_size;
	char *old = NULL;
	if (fl >= 0 && (fl & (O_DSYNC | O_SYNC)) && !drop_syncs) {
		r.type = 'D';
	} else {
		r.type = 'W';
		if (off < st.st_size) {
			size_t want = (size_t)(st.st_size - off) < n ? (size_t)(st.st_size - off) : n;
			old = malloc(want ? want : 1);
			ssize_t got = old ? read_old(fd, old, want, off) : -1;
			if (got < 0) {
				fprintf(stderr, "powerloss: cannot read %s before a write: %s\n", path,
					strerror(errno));
				abort();
			}
			r.data_len = (uint64_t)got;
		}
	}
	pthread_mutex_lock(&mu);
	append(&r, path, NULL, old);
	pthread_mutex_unlock(&mu);
	free(old);
	errno = saved;
}

static size_t iov_len(const struct iovec *iov, int cnt)
{
	size_t n = 0;
	for (int i = 0; i < cnt; i++)
		n += iov[i].iov_len;
	return n;
}

/* Before a size change of fd's file to new_size (grow only: fallocate). */
static void before_size(int fd, off_t new_size, int grow_only)
{
	if (!active())
		return;
	int saved = errno;
	char path[PATH_MAX];
	struct stat st;
	if (fd_path(fd, path, &st) != 0 || !S_ISREG(st.st_mode)) {
		errno = saved;
		return;
	}
	if (grow_only && new_size <= st.st_size) {
		errno = saved;
		return;
	}
	struct rec r = {0};
	r.type = 'T';
	r.dev = st.st_dev;
	r.ino = st.st_ino;
	r.off = new_size;
	r.old_size = st.st_size;
	char *tail = NULL;
	if (new_size < st.st_size) {
		size_t n = (size_t)(st.st_size - new_size);
		tail = malloc(n);
		ssize_t got = tail ? read_old(fd, tail, n, new_size) : -1;
		if (got < 0) {
			fprintf(stderr, "powerloss: cannot read %s before a truncate\n", path);
			abort();
		}
		r.data_len = (uint64_t)got;
	}
	pthread_mutex_lock(&mu);
	append(&r, path, NULL, tail);
	pthread_mutex_unlock(&mu);
	free(tail);
	errno = saved;
}

/* Around a sync of fd: the position before the call, then the mark once it succeeded.
 * With a sync delay the call waits first: a kill then finds un-synced writes more often. */
static uint64_t sync_begin(void)
{
	if (sync_delay_ms > 0) {
		struct timespec ts = {sync_delay_ms / 1000, (long)(sync_delay_ms % 1000) * 1000000L};
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
	}
	pthread_mutex_lock(&mu);
	uint64_t s = next_seq;
	pthread_mutex_unlock(&mu);
	return s;
}

static void sync_done(int fd, uint64_t begin, int rc)
{
	if (rc != 0 || !active() || drop_syncs)
		return;
	int saved = errno;
	char path[PATH_MAX];
	struct stat st;
	if (fd_path(fd, path, &st) == 0) {
		struct rec r = {0};
		r.type = 'S';
		r.dev = st.st_dev;
		r.ino = st.st_ino;
		r.off = (int64_t)begin;
		pthread_mutex_lock(&mu);
		append(&r, path, NULL, NULL);
		pthread_mutex_unlock(&mu);
	}
	errno = saved;
}

/* Stashes path (if it exists) as a hard link <journal>.stash/<seq>; returns 1 if it did. */
static int stash(const char *path, uint64_t seq)
{
	struct stat st;
	if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode))
		return 0;
	char sd[PATH_MAX], sp[PATH_MAX + 32];
	snprintf(sd, sizeof(sd), "%s.stash", getenv("POWERLOSS_JOURNAL"));
	mkdir(sd, 0700);
	snprintf(sp, sizeof(sp), "%s/%llu", sd, (unsigned long long)seq);
	if (link(path, sp) != 0) {
		fprintf(stderr, "powerloss: cannot stash %s as %s: %s\n", path, sp, strerror(errno));
		abort();
	}
	return 1;
}

/* Before a directory change: C (creation of path), U (unlink of path), R (path -> path2).
 * Returns the record's seq, 0 if none was made. */
static uint64_t dir_record(char type, const char *path, const char *path2)
{
	struct rec r = {0};
	r.type = type;
	if (parent_id(path, &r.dev, &r.ino) != 0)
		return 0;
	if (path2 && parent_id(path2, &r.dev2, &r.ino2) != 0)
		return 0;
	pthread_mutex_lock(&mu);
	uint64_t seq = next_seq;
	if (type == 'R')
		r.flags = (uint64_t)stash(path2, seq);
	else if (type == 'U')
		r.flags = (uint64_t)stash(path, seq);
	append(&r, path, path2, NULL);
	pthread_mutex_unlock(&mu);
	return seq;
}

/* ---- the wrapped calls ---- */

int fsync(int fd)
{
	uint64_t b = active() ? sync_begin() : 0;
	int rc = get_fsync()(fd);
	sync_done(fd, b, rc);
	return rc;
}

int fdatasync(int fd)
{
	uint64_t b = active() ? sync_begin() : 0;
	int rc = get_fdatasync()(fd);
	sync_done(fd, b, rc);
	return rc;
}

int sync_file_range(int fd, off64_t off, off64_t n, unsigned int flags)
{
	uint64_t b = active() ? sync_begin() : 0;
	int rc = get_sync_file_range()(fd, off, n, flags);
	/* only a waiting call over the whole file counts as a sync (no ranges modelled) */
	if ((flags & SYNC_FILE_RANGE_WAIT_AFTER) && off == 0 && n == 0)
		sync_done(fd, b, rc);
	return rc;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	before_write(fd, n, off);
	return get_pwrite()(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
	before_write(fd, n, off);
	return get_pwrite64()(fd, buf, n, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
	before_write(fd, iov_len(iov, cnt), off);
	return get_pwritev()(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
	before_write(fd, iov_len(iov, cnt), off);
	return get_pwritev64()(fd, iov, cnt, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	before_write(fd, iov_len(iov, cnt), -1);
	return get_writev()(fd, iov, cnt);
}

ssize_t write(int fd, const void *buf, size_t n)
{
	/* the journal itself and stdout/stderr (the log) pass straight through */
	if (fd > 2 && fd != jfd)
		before_write(fd, n, -1);
	return get_write()(fd, buf, n);
}

int ftruncate(int fd, off_t len)
{
	before_size(fd, len, 0);
	return get_ftruncate()(fd, len);
}

int ftruncate64(int fd, off64_t len)
{
	before_size(fd, len, 0);
	return get_ftruncate64()(fd, len);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
	if (!(mode & FALLOC_FL_KEEP_SIZE))
		before_size(fd, off + len, 1);
	return get_fallocate()(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
	if (!(mode & FALLOC_FL_KEEP_SIZE))
		before_size(fd, off + len, 1);
	return get_fallocate64()(fd, mode, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len)
{
	before_size(fd, off + len, 1);
	return get_posix_fallocate()(fd, off, len);
}

int posix_fallocate64(int fd, off64_t off, off64_t len)
{
	before_size(fd, off + len, 1);
	return get_posix_fallocate64()(fd, off, len);
}

/* An open that may create: records C if the file did not exist and is under the dir. */
static int creating(int dirfd, const char *path, int flags, char *abs)
{
	struct stat st;
	if (!(flags & O_CREAT) || !active() || abs_path(dirfd, path, abs) != 0 || !under_dir(abs))
		return 0;
	return lstat(abs, &st) != 0 && errno == ENOENT;
}

/* After the open: records the creation creating() saw coming, keeps the open's errno. */
static int created(int c, const char *abs, int fd)
{
	int saved = errno;
	if (c && fd >= 0)
		dir_record('C', abs, NULL);
	errno = saved;
	return fd;
}

#define OPEN_MODE(flags, mode)                                                              \
	mode_t mode = 0;                                                                     \
	if (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE) {                    \
		va_list ap;                                                                  \
		va_start(ap, flags);                                                         \
		mode = (mode_t)va_arg(ap, int);                                              \
		va_end(ap);                                                                  \
	}

/* A creation is recorded after the open (the file must exist for its directory to be
 * known); a kill in between leaves a file the journal does not know: it is then kept, as
 * an empty or partly written file would be by a file system that committed its entry. */
int open(const char *path, int flags, ...)
{
	OPEN_MODE(flags, mode)
	char abs[PATH_MAX];
	int c = creating(AT_FDCWD, path, flags, abs);
	return created(c, abs, get_open()(path, flags, mode));
}

int open64(const char *path, int flags, ...)
{
	OPEN_MODE(flags, mode)
	char abs[PATH_MAX];
	int c = creating(AT_FDCWD, path, flags, abs);
	return created(c, abs, get_open64()(path, flags, mode));
}

int openat(int dirfd, const char *path, int flags, ...)
{
	OPEN_MODE(flags, mode)
	char abs[PATH_MAX];
	int c = creating(dirfd, path, flags, abs);
	return created(c, abs, get_openat()(dirfd, path, flags, mode));
}

int openat64(int dirfd, const char *path, int flags, ...)
{
	OPEN_MODE(flags, mode)
	char abs[PATH_MAX];
	int c = creating(dirfd, path, flags, abs);
	return created(c, abs, get_openat64()(dirfd, path, flags, mode));
}

int creat(const char *path, mode_t mode)
{
	char abs[PATH_MAX];
	int c = creating(AT_FDCWD, path, O_CREAT, abs);
	return created(c, abs, get_creat()(path, mode));
}

/* rename: recorded (and the replaced file stashed) before the call. A failed rename
 * leaves a record of a change that did not happen: undoing it would move the files wrongly,
 * so the record is cancelled by a second one (type 'X': undo nothing for this seq). */
static int do_rename(int od, const char *op, int nd, const char *np, unsigned int fl, int how)
{
	char a[PATH_MAX], b[PATH_MAX];
	int track = active() && abs_path(od, op, a) == 0 && abs_path(nd, np, b) == 0 &&
		    under_dir(a) && under_dir(b);
	uint64_t seq = 0;
	if (track)
		seq = dir_record('R', a, b);
	int rc = how == 0 ? get_rename()(op, np)
		 : how == 1 ? get_renameat()(od, op, nd, np)
			    : get_renameat2()(od, op, nd, np, fl);
	if (seq != 0 && rc != 0) {
		int saved = errno;
		struct rec r = {0};
		r.type = 'X';
		r.off = (int64_t)seq;
		pthread_mutex_lock(&mu);
		append(&r, NULL, NULL, NULL);
		pthread_mutex_unlock(&mu);
		errno = saved;
	}
	return rc;
}

int rename(const char *op, const char *np)
{
	return do_rename(AT_FDCWD, op, AT_FDCWD, np, 0, 0);
}

int renameat(int od, const char *op, int nd, const char *np)
{
	return do_rename(od, op, nd, np, 0, 1);
}

int renameat2(int od, const char *op, int nd, const char *np, unsigned int fl)
{
	return do_rename(od, op, nd, np, fl, 2);
}

static int do_unlink(int dirfd, const char *path, int flags, int at)
{
	char a[PATH_MAX];
	int track = !(flags & AT_REMOVEDIR) && active() && abs_path(dirfd, path, a) == 0 &&
		    under_dir(a);
	uint64_t seq = 0;
	if (track)
		seq = dir_record('U', a, NULL);
	int rc = at ? get_unlinkat()(dirfd, path, flags) : get_unlink()(path);
	if (seq != 0 && rc != 0) {
		int saved = errno;
		struct rec r = {0};
		r.type = 'X';
		r.off = (int64_t)seq;
		pthread_mutex_lock(&mu);
		append(&r, NULL, NULL, NULL);
		pthread_mutex_unlock(&mu);
		errno = saved;
	}
	return rc;
}

int unlink(const char *path)
{
	return do_unlink(AT_FDCWD, path, 0, 0);
}

int unlinkat(int dirfd, const char *path, int flags)
{
	return do_unlink(dirfd, path, flags, 1);
}

/* A shared writable mapping of a tracked file: noted (M), see the header. */
static void note_mmap(int prot, int flags, int fd)
{
	if (fd < 0 || !(prot & PROT_WRITE) || !(flags & MAP_SHARED) || !active())
		return;
	int saved = errno;
	char path[PATH_MAX];
	struct stat st;
	if (fd_path(fd, path, &st) == 0 && S_ISREG(st.st_mode)) {
		struct rec r = {0};
		r.type = 'M';
		r.dev = st.st_dev;
		r.ino = st.st_ino;
		pthread_mutex_lock(&mu);
		append(&r, path, NULL, NULL);
		pthread_mutex_unlock(&mu);
	}
	errno = saved;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	note_mmap(prot, flags, fd);
	return get_mmap()(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	note_mmap(prot, flags, fd);
	return get_mmap64()(addr, len, prot, flags, fd, off);
}
