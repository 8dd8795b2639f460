/*
 * slowdisk.c - an LD_PRELOAD shim that makes a member's disk slow or failing, switched at
 * run time by the fault campaign (tests/fault/campaign.py) and nothing else.
 *
 *   LD_PRELOAD=.../libslowdisk.so SLOWDISK_CONTROL=/tmp/x/disk keelson ...
 *   echo "sync_delay_ms=200 write_delay_ms=0 fail=0" > /tmp/x/disk
 *
 * It wraps the calls that put data on disk: fsync, fdatasync, msync, sync_file_range (the
 * syncs) and pwrite, pwrite64, pwritev, writev, write (the writes; LMDB writes pages with
 * pwrite/writev and fdatasyncs, and writes its meta page through an O_DSYNC descriptor).
 * Only descriptors of regular files are touched: sockets and pipes (gRPC, the peer links,
 * the log on stdout) pass straight through.
 *
 * The control file holds `key=value` words (any order, missing ones are 0):
 *   sync_delay_ms   sleep this long before each sync
 *   write_delay_ms  sleep this long before each write
 *   fail            1: every write and sync fails with EIO, nothing reaches the file
 *   enospc          1: the disk is full: every write, sync, ftruncate and fallocate fails
 *                   with ENOSPC, nothing reaches the file (reads still work)
 * It is re-read when its modification time or size changes (one stat() per call); a
 * missing or unreadable file means "no fault". Without SLOWDISK_CONTROL the shim does
 * nothing at all.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
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

/* The current fault, as last read from the control file. */
static atomic_int sync_delay_ms;
static atomic_int write_delay_ms;
static atomic_int fail_io;
static atomic_int disk_full;

static pthread_mutex_t reload_mu = PTHREAD_MUTEX_INITIALIZER;
static struct timespec seen_mtime; /* of the control file when last read; guarded by reload_mu */
static off_t seen_size = -1;

REAL(fsync, int, int)
REAL(fdatasync, int, int)
REAL(msync, int, void *, size_t, int)
REAL(sync_file_range, int, int, off64_t, off64_t, unsigned int)
REAL(pwrite, ssize_t, int, const void *, size_t, off_t)
REAL(pwrite64, ssize_t, int, const void *, size_t, off64_t)
REAL(pwritev, ssize_t, int, const struct iovec *, int, off_t)
REAL(writev, ssize_t, int, const struct iovec *, int)
REAL(write, ssize_t, int, const void *, size_t)
REAL(ftruncate, int, int, off_t)
REAL(ftruncate64, int, int, off64_t)
REAL(fallocate, int, int, int, off_t, off_t)
REAL(fallocate64, int, int, int, off64_t, off64_t)
REAL(posix_fallocate, int, int, off_t, off_t)
REAL(posix_fallocate64, int, int, off64_t, off64_t)

/* Reads the control file if it changed since the last read. Uses the real read path only
 * (open/read are not wrapped), so it cannot recurse. */
static void maybe_reload(void)
{
	const char *path = getenv("SLOWDISK_CONTROL");
	if (path == NULL)
		return;
	struct stat st;
	if (stat(path, &st) != 0) {
		/* no file: no fault */
		atomic_store(&sync_delay_ms, 0);
		atomic_store(&write_delay_ms, 0);
		atomic_store(&fail_io, 0);
		atomic_store(&disk_full, 0);
		return;
	}
	pthread_mutex_lock(&reload_mu);
	if (st.st_size == seen_size && st.st_mtim.tv_sec == seen_mtime.tv_sec &&
	    st.st_mtim.tv_nsec == seen_mtime.tv_nsec) {
		pthread_mutex_unlock(&reload_mu);
		return;
	}
	char buf[256];
	ssize_t n = -1;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
	}
	if (n >= 0) {
		buf[n] = '\0';
		int sd = 0, wd = 0, fl = 0, full = 0;
		for (char *save = NULL, *w = strtok_r(buf, " \t\r\n", &save); w;
		     w = strtok_r(NULL, " \t\r\n", &save)) {
			if (strncmp(w, "sync_delay_ms=", 14) == 0)
				sd = atoi(w + 14);
			else if (strncmp(w, "write_delay_ms=", 15) == 0)
				wd = atoi(w + 15);
			else if (strncmp(w, "fail=", 5) == 0)
				fl = atoi(w + 5);
			else if (strncmp(w, "enospc=", 7) == 0)
				full = atoi(w + 7);
		}
		atomic_store(&sync_delay_ms, sd);
		atomic_store(&write_delay_ms, wd);
		atomic_store(&fail_io, fl);
		atomic_store(&disk_full, full);
		seen_size = st.st_size;
		seen_mtime = st.st_mtim;
	}
	pthread_mutex_unlock(&reload_mu);
}

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int is_regular(int fd)
{
	struct stat st;
	return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

/* Applies the current fault to one call on fd: sleeps first if asked. Returns 0 to go on
 * with the real call, or the errno value (EIO, ENOSPC) the call must fail with. sync: a
 * sync (else a write). */
static int fault_errno(int fd, int sync)
{
	/* stdout/stderr may be a log file: keep it, the reason a member stops goes there */
	if (getenv("SLOWDISK_CONTROL") == NULL || (fd >= 0 && (fd <= 2 || !is_regular(fd))))
		return 0;
	int saved = errno;
	maybe_reload();
	int ms = atomic_load(sync ? &sync_delay_ms : &write_delay_ms);
	if (ms > 0)
		sleep_ms(ms);
	errno = saved;
	if (atomic_load(&fail_io))
		return EIO;
	if (atomic_load(&disk_full))
		return ENOSPC;
	return 0;
}

/* The same for calls that report failure as -1 with errno. */
static int fault(int fd, int sync)
{
	int err = fault_errno(fd, sync);
	if (err != 0) {
		errno = err;
		return -1;
	}
	return 0;
}

int fsync(int fd)
{
	if (fault(fd, 1) != 0)
		return -1;
	return get_fsync()(fd);
}

int fdatasync(int fd)
{
	if (fault(fd, 1) != 0)
		return -1;
	return get_fdatasync()(fd);
}

int msync(void *addr, size_t len, int flags)
{
	if (fault(-1, 1) != 0)
		return -1;
	return get_msync()(addr, len, flags);
}

int sync_file_range(int fd, off64_t off, off64_t n, unsigned int flags)
{
	if (fault(fd, 1) != 0)
		return -1;
	return get_sync_file_range()(fd, off, n, flags);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_pwrite()(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_pwrite64()(fd, buf, n, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_pwritev()(fd, iov, cnt, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_writev()(fd, iov, cnt);
}

ssize_t write(int fd, const void *buf, size_t n)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_write()(fd, buf, n);
}

int ftruncate(int fd, off_t len)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_ftruncate()(fd, len);
}

int ftruncate64(int fd, off64_t len)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_ftruncate64()(fd, len);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_fallocate()(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
	if (fault(fd, 0) != 0)
		return -1;
	return get_fallocate64()(fd, mode, off, len);
}

/* posix_fallocate returns the error number instead of setting errno. */
int posix_fallocate(int fd, off_t off, off_t len)
{
	int err = fault_errno(fd, 0);
	if (err != 0)
		return err;
	return get_posix_fallocate()(fd, off, len);
}

int posix_fallocate64(int fd, off64_t off, off64_t len)
{
	int err = fault_errno(fd, 0);
	if (err != 0)
		return err;
	return get_posix_fallocate64()(fd, off, len);
}
