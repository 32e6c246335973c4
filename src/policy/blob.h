/* What the shared-state blobs have in common (upstream.h, spend.h): why a load
 * was refused, and the FNV-1a hash their settings fingerprints are made of. */
#ifndef STURDY_BLOB_H
#define STURDY_BLOB_H

#include <stddef.h>
#include <stdint.h>

enum {
    ST_BLOB_OK = 0, ST_BLOB_SIZE, ST_BLOB_MAGIC, ST_BLOB_VERSION, ST_BLOB_LAYOUT, ST_BLOB_CONFIG, ST_BLOB_INVALID
};

#define ST_FNV_OFFSET UINT64_C(0xcbf29ce484222325)

/* FNV-1a of n bytes at p, continuing from h. */
uint64_t st_fnv(uint64_t h, const void *p, size_t n);

/* Each field on its own, so padding bytes never reach the hash. */
#define ST_FNV_FIELD(h, x) ((h) = st_fnv((h), &(x), sizeof(x)))

#endif
