/* What the shared-state blobs have in common (upstream.h, spend.h): their
 * frame, why a load was refused, and the FNV-1a hash their settings
 * fingerprints are made of.
 *
 * A blob, exactly st_blob_size(kind) bytes:
 *   stamp                       uint32, the caller's
 *   magic                       4 bytes
 *   version                     uint32
 *   layout                      ST_BLOB_PARTS uint32: the sizes of the structs
 *                               in the payload, 0 past the last
 *   settings fingerprint        uint64
 *   payload                     kind->payload bytes
 *   stamp again                 uint32
 * in the byte order and layout of the process that wrote it: a blob is for
 * processes of one build on one machine, never for storage or the network.
 * The stamp (a save counter, say) opens and closes the blob so that successive
 * blobs differ in their first and last bytes: Lua interns a long string by a
 * hash of a few of its bytes, and blobs alike there would all share one hash
 * chain, making each new one cost a comparison with every other alive. */
#ifndef STURDY_BLOB_H
#define STURDY_BLOB_H

#include <stddef.h>
#include <stdint.h>

enum {
    ST_BLOB_OK = 0, ST_BLOB_SIZE, ST_BLOB_MAGIC, ST_BLOB_VERSION, ST_BLOB_LAYOUT, ST_BLOB_CONFIG, ST_BLOB_INVALID
};

#define ST_BLOB_PARTS 3

/* What one kind of blob holds. */
typedef struct st_blob_kind {
    char magic[4];
    uint32_t version;
    uint32_t layout[ST_BLOB_PARTS];
    size_t payload;
} st_blob_kind;

size_t st_blob_size(const st_blob_kind *kind);

/* Writes the frame of a blob of kind into out (the head, and the stamp that
 * closes it) and returns where its payload goes, or NULL when cap is too small. */
unsigned char *st_blob_frame(const st_blob_kind *kind, uint64_t fingerprint, uint32_t stamp,
                             void *out, size_t cap);

/* The payload of blob when its frame is one of kind made under the settings
 * of fingerprint; else NULL, with *why saying which check refused it. */
const unsigned char *st_blob_payload(const st_blob_kind *kind, uint64_t fingerprint,
                                     const void *blob, size_t len, int *why);

#define ST_FNV_OFFSET UINT64_C(0xcbf29ce484222325)

/* FNV-1a of n bytes at p, continuing from h. */
uint64_t st_fnv(uint64_t h, const void *p, size_t n);

/* Each field on its own, so padding bytes never reach the hash. */
#define ST_FNV_FIELD(h, x) ((h) = st_fnv((h), &(x), sizeof(x)))

#endif
