/* The LD_PRELOAD shims' (slowdisk.c, powerloss.c) access to the functions they wrap. */
#ifndef KEELSON_TESTS_FAULT_REAL_H
#define KEELSON_TESTS_FAULT_REAL_H

#include <dlfcn.h>

/* REAL(write, ssize_t, int, const void *, size_t) defines get_write(), the next definition
 * of write after the shim's, looked up once (dlsym is not async-signal-safe, but the shims'
 * wrappers are not called from signal handlers). */
#define REAL(name, ret, ...)                                                                 \
	static ret (*real_##name)(__VA_ARGS__);                                              \
	static ret (*get_##name(void))(__VA_ARGS__)                                         \
	{                                                                                    \
		if (real_##name == NULL)                                                     \
			real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name);          \
		return real_##name;                                                          \
	}

#endif
