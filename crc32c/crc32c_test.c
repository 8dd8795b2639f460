/* crc32c_test.c - known values (Go's crc32 with the Castagnoli table), continuation, and
 * the instruction path against the table path over every alignment and many lengths. */
#include "crc32c/crc32c.c" /* the static paths, to compare them */

#include <stdio.h>
#include <stdlib.h>
#include "tests/unit/check.h"


int main(void)
{
	/* The check value of CRC-32C (RFC 3720, B.4) and RFC 3720's 32-byte vectors. */
	CHECK(crc32c(0, "123456789", 9) == 0xE3069283u);
	CHECK(crc32c(0, "", 0) == 0);
	uint8_t zeros[32] = {0}, ones[32], inc[32];
	memset(ones, 0xff, sizeof(ones));
	for (int i = 0; i < 32; i++)
		inc[i] = (uint8_t)i;
	CHECK(crc32c(0, zeros, 32) == 0x8A9136AAu);
	CHECK(crc32c(0, ones, 32) == 0x62A8AB43u);
	CHECK(crc32c(0, inc, 32) == 0x46DD794Eu);
	CHECK(crc32c_portable(0, (const uint8_t *)"123456789", 9) == 0xE3069283u);

	/* Continuation, and both paths alike at every alignment and length up to 300. */
	uint8_t buf[512];
	srand(7);
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)rand();
	for (size_t off = 0; off < 8; off++)
		for (size_t n = 0; n <= 300; n++) {
			uint32_t want = crc32c_portable(0, buf + off, n);
			CHECK(crc32c(0, buf + off, n) == want);
			size_t cut = n / 3;
			CHECK(crc32c(crc32c(0, buf + off, cut), buf + off + cut, n - cut) == want);
			CHECK(crc32c(0x12345678u, buf + off, n) == crc32c_portable(0x12345678u, buf + off, n));
		}
	if (check_failures) {
		fprintf(stderr, "crc32c_test: %d failures\n", check_failures);
		return 1;
	}
	printf("crc32c_test: ok\n");
	return 0;
}
