/*
 * racy.c - a deliberate data race, for tests/test_tsan.py: it shows that the harness
 * (libtsan preloaded, halt_on_error, the exit code) reports a race when there is one.
 */
#include <pthread.h>

static long counter;

static void *bump(void *arg)
{
	for (int i = 0; i < 100000; i++)
		counter++;
	return arg;
}

int race(void)
{
	pthread_t t1, t2;

	pthread_create(&t1, NULL, bump, NULL);
	pthread_create(&t2, NULL, bump, NULL);
	pthread_join(t1, NULL);
	pthread_join(t2, NULL);
	return (int)counter;
}
