/* Specs for SHA-256: the FIPS 180-4 example vectors (NIST CSRC), the lengths
 * around the padding boundary, and splits of one message at every byte. */
#include "test.h"

#include "sha256.h"

#include <stdlib.h>
#include <string.h>

static int digest_is(const void *data, size_t len, const char *want)
{
    unsigned char d[ST_SHA256_DIGEST];
    char hex[ST_SHA256_HEX];

    st_sha256_digest(data, len, d);
    st_sha256_hex(d, hex);
    if (strcmp(hex, want) != 0) {
        fprintf(stderr, "    len %zu: got %s, want %s\n", len, hex, want);
        return 0;
    }
    return 1;
}

static void test_fips_vectors(void)
{
    static const char two_block[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    static const char long_two_block[] = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
                                         "hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
    char *million = malloc(1000000);

    CHECK(digest_is("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    CHECK(digest_is("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    CHECK(digest_is(two_block, strlen(two_block),
                    "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
    CHECK(digest_is(long_two_block, strlen(long_two_block),
                    "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"));
    if (CHECK(million != NULL)) {
        memset(million, 'a', 1000000);
        CHECK(digest_is(million, 1000000,
                        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
        free(million);
    }
}

/* 55 bytes is the longest message whose padding fits its last block; 56 needs
 * another block; 64 fills one exactly. */
static void test_padding_boundaries(void)
{
    static const struct { size_t len; const char *hex; } cases[] = {
        { 55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318" },
        { 56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a" },
        { 63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34" },
        { 64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb" },
        { 65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0" },
        { 119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb" },
        { 120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c" },
    };
    char a[120];
    size_t i;

    memset(a, 'a', sizeof a);
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK(digest_is(a, cases[i].len, cases[i].hex));
    /* bytes above 0x7f are bytes, not chars */
    CHECK(digest_is("\x00\xff\x80", 3, "f742b965f156c10374bc23aea96e3a8aff8facd6fc079defeaa30219ad86f211"));
}

/* Any split into three updates gives the one-call digest. */
static void test_splits(void)
{
    unsigned char msg[200], want[ST_SHA256_DIGEST], got[ST_SHA256_DIGEST];
    size_t i, j, bad = 0;
    st_sha256 ctx;

    for (i = 0; i < sizeof msg; i++)
        msg[i] = (unsigned char)(i * 7 + 3);
    st_sha256_digest(msg, sizeof msg, want);
    for (i = 0; i <= sizeof msg; i++) {
        for (j = i; j <= sizeof msg; j += 13) {
            st_sha256_init(&ctx);
            st_sha256_update(&ctx, msg, i);
            st_sha256_update(&ctx, msg + i, j - i);
            st_sha256_update(&ctx, msg + j, sizeof msg - j);
            st_sha256_final(&ctx, got);
            if (memcmp(got, want, sizeof want) != 0)
                bad++;
        }
    }
    CHECK_EQ_INT(bad, 0);
    /* a context is reusable after init */
    st_sha256_init(&ctx);
    st_sha256_update(&ctx, "abc", 3);
    st_sha256_final(&ctx, got);
    st_sha256_init(&ctx);
    st_sha256_update(&ctx, "abc", 3);
    st_sha256_final(&ctx, want);
    CHECK(memcmp(got, want, sizeof want) == 0);
}

int main(void)
{
    test_fips_vectors();
    test_padding_boundaries();
    test_splits();
    return TEST_REPORT();
}
