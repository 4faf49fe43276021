/*
 * slow_sync.c - LD_PRELOAD shim for tests: fdatasync and fsync on files whose path contains
 * $SLOW_SYNC_MATCH take $SLOW_SYNC_MS milliseconds longer, as on a slow disk, while the file
 * $SLOW_SYNC_FLAG exists (so a server starts at full speed and the test decides when the disk
 * turns slow). It holds one namespace's backend inside a flush so that a test can watch
 * whether other namespaces wait for it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void maybe_sleep(int fd)
{
	const char *match = getenv("SLOW_SYNC_MATCH");
	const char *ms = getenv("SLOW_SYNC_MS");
	const char *flag = getenv("SLOW_SYNC_FLAG");
	char link[64], path[4096];
	ssize_t n;

	if (!match || !*match || !flag || access(flag, F_OK) != 0)
		return;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, path, sizeof(path) - 1);
	if (n < 0)
		return;
	path[n] = '\0';
	if (strstr(path, match)) {
		long delay = ms ? atol(ms) : 2000;
		struct timespec t = { delay / 1000, (delay % 1000) * 1000000L };

		nanosleep(&t, NULL);
	}
}

int fdatasync(int fd)
{
	static int (*real)(int);

	if (!real)
		real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
	maybe_sleep(fd);
	return real(fd);
}

int fsync(int fd)
{
	static int (*real)(int);

	if (!real)
		real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
	maybe_sleep(fd);
	return real(fd);
}
