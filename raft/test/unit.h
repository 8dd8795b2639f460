/* unit.h - a tiny test runner: TEST(name) { ... CHECK(cond); } */
#ifndef KEELSON_RAFT_TEST_UNIT_H
#define KEELSON_RAFT_TEST_UNIT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*unit_fn)(void);
struct unit_test {
    const char *name;
    unit_fn fn;
};
extern struct unit_test unit_tests[];
extern int unit_n;
extern int unit_failed_checks;

#define TEST(tname)                                                                \
    static void test_##tname(void);                                                \
    __attribute__((constructor)) static void reg_##tname(void)                     \
    {                                                                             \
        unit_tests[unit_n].name = #tname;                                          \
        unit_tests[unit_n++].fn = test_##tname;                                    \
    }                                                                             \
    static void test_##tname(void)

#define CHECK(c)                                                                  \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
            unit_failed_checks++;                                                 \
        }                                                                         \
    } while (0)

#define CHECK_EQ(a, b)                                                            \
    do {                                                                          \
        unsigned long long a_ = (unsigned long long)(a), b_ = (unsigned long long)(b); \
        if (a_ != b_) {                                                           \
            fprintf(stderr, "  %s:%d: CHECK_EQ failed: %s == %llu, %s == %llu\n",  \
                    __FILE__, __LINE__, #a, a_, #b, b_);                           \
            unit_failed_checks++;                                                 \
        }                                                                         \
    } while (0)

#define UNIT_MAIN()                                                               \
    struct unit_test unit_tests[512];                                             \
    int unit_n, unit_failed_checks;                                               \
    int main(int argc, char **argv)                                               \
    {                                                                             \
        int failed = 0;                                                           \
        for (int i = 0; i < unit_n; i++) {                                        \
            if (argc > 1 && strstr(unit_tests[i].name, argv[1]) == NULL)          \
                continue;                                                         \
            int before = unit_failed_checks;                                      \
            unit_tests[i].fn();                                                   \
            int ok = unit_failed_checks == before;                                \
            printf("%s %s\n", ok ? "PASS" : "FAIL", unit_tests[i].name);          \
            failed += !ok;                                                        \
        }                                                                         \
        printf("%d tests, %d failed\n", unit_n, failed);                          \
        return failed ? 1 : 0;                                                    \
    }

#endif
