#include "blob.h"

#include <string.h>

typedef struct blob_head {
    uint32_t stamp;
    char magic[4];
    uint32_t version, layout[ST_BLOB_PARTS];
    uint64_t fingerprint;
} blob_head;

size_t st_blob_size(const st_blob_kind *kind)
{
    return sizeof(blob_head) + kind->payload + sizeof(uint32_t);
}

unsigned char *st_blob_frame(const st_blob_kind *kind, uint64_t fingerprint, uint32_t stamp,
                             void *out, size_t cap)
{
    unsigned char *p = out;
    blob_head h;

    if (cap < st_blob_size(kind))
        return NULL;
    memset(&h, 0, sizeof h);
    h.stamp = stamp;
    memcpy(h.magic, kind->magic, sizeof h.magic);
    h.version = kind->version;
    memcpy(h.layout, kind->layout, sizeof h.layout);
    h.fingerprint = fingerprint;
    memcpy(p, &h, sizeof h);
    memcpy(p + sizeof h + kind->payload, &stamp, sizeof stamp);
    return p + sizeof h;
}

static const unsigned char *refuse(int *why, int reason)
{
    *why = reason;
    return NULL;
}

const unsigned char *st_blob_payload(const st_blob_kind *kind, uint64_t fingerprint,
                                     const void *blob, size_t len, int *why)
{
    blob_head h;

    if (blob == NULL || len != st_blob_size(kind))
        return refuse(why, ST_BLOB_SIZE);
    memcpy(&h, blob, sizeof h);
    if (memcmp(h.magic, kind->magic, sizeof h.magic) != 0)
        return refuse(why, ST_BLOB_MAGIC);
    if (h.version != kind->version)
        return refuse(why, ST_BLOB_VERSION);
    if (memcmp(h.layout, kind->layout, sizeof h.layout) != 0)
        return refuse(why, ST_BLOB_LAYOUT);
    if (h.fingerprint != fingerprint)
        return refuse(why, ST_BLOB_CONFIG);
    *why = ST_BLOB_OK;
    return (const unsigned char *)blob + sizeof h;
}

uint64_t st_fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    size_t i;
    for (i = 0; i < n; i++)
        h = (h ^ b[i]) * UINT64_C(0x100000001b3);
    return h;
}
