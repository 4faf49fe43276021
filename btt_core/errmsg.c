/*
 * errmsg.c - the engine's error text: every failing call leaves one line in a per-thread
 * buffer (btt_errmsg) and returns a negative errno.
 */
#include <stdarg.h>
#include <stdio.h>

#include "btt_int.h"

static __thread char errbuf[ERRMSG_MAX];

int seterr(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
	return -err;
}

const char *btt_errmsg(void)
{
	return errbuf;
}
