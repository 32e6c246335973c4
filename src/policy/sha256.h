/* SHA-256 (FIPS 180-4), for cache keys: a digest of the canonical request, so
 * distinct requests never collide in practice and the request itself need not
 * be kept.
 *
 *   st_sha256 ctx;
 *   st_sha256_init(&ctx);
 *   st_sha256_update(&ctx, data, len);    (any number of times, any split)
 *   st_sha256_final(&ctx, digest);        (32 bytes; ctx must be re-initialised to reuse)
 *
 * The digest depends only on the concatenation of the bytes given to update,
 * never on how they were split. Messages up to 2^61 - 1 bytes (the FIPS limit
 * of 2^64 - 1 bits); the length counter wraps beyond that. No allocation; the
 * context is a plain struct that may live on the stack. st_sha256_hex writes
 * the 64 lowercase hex digits and a NUL (65 bytes). */
#ifndef STURDY_SHA256_H
#define STURDY_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define ST_SHA256_DIGEST 32
#define ST_SHA256_HEX 65

typedef struct st_sha256 {
    uint32_t state[8];
    uint64_t bytes;             /* message length so far */
    unsigned char block[64];    /* the partial block */
    size_t fill;                /* bytes in block, < 64 */
} st_sha256;

void st_sha256_init(st_sha256 *ctx);
void st_sha256_update(st_sha256 *ctx, const void *data, size_t len);
void st_sha256_final(st_sha256 *ctx, unsigned char digest[ST_SHA256_DIGEST]);

/* One call: the digest of data[0..len). */
void st_sha256_digest(const void *data, size_t len, unsigned char digest[ST_SHA256_DIGEST]);
/* The digest as lowercase hex, NUL-terminated. */
void st_sha256_hex(const unsigned char digest[ST_SHA256_DIGEST], char hex[ST_SHA256_HEX]);

#endif
