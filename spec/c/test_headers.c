/* Specs for the response-head parser every transport shares: status lines,
 * header lines, limits, lookups. */
#include "test.h"

#include "headers.h"

#include <string.h>

#define LINE(s) (s), sizeof(s) - 1

static void test_status_lines(void)
{
    int status = 0, version = 0;

    CHECK(st_status_line_parse(LINE("HTTP/1.1 200 OK\r\n"), &status, &version));
    CHECK_EQ_INT(status, 200);
    CHECK_EQ_INT(version, 11);
    CHECK(st_status_line_parse(LINE("HTTP/1.0 529"), &status, &version));
    CHECK_EQ_INT(status, 529);
    CHECK_EQ_INT(version, 10);
    CHECK(st_status_line_parse(LINE("HTTP/2 404 \r\n"), &status, &version));
    CHECK_EQ_INT(version, 20);
    CHECK(st_status_line_parse(LINE("HTTP/3 100\n"), &status, NULL));
    CHECK_EQ_INT(status, 100);

    CHECK(!st_status_line_parse(LINE("HTTP/1.1 abc\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.1 000 Zero\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.1 99 Low\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.1 600 High\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.1 2000\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.1  200\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.2 200\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/9 200\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("ICY 200 OK\r\n"), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/1.1 20"), &status, &version));
    CHECK(!st_status_line_parse(LINE(""), &status, &version));
    CHECK(!st_status_line_parse(LINE("HTTP/"), &status, &version));
}

static void test_header_lines(void)
{
    st_headers h;
    size_t cursor = 0;
    const char *name, *value;

    memset(&h, 0, sizeof h);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("Retry-After:  7 \r\n")), ST_HEADERS_OK);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("x-empty:\r\n")), ST_HEADERS_OK);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("Set-Cookie: a=1\n")), ST_HEADERS_OK);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("set-cookie: b=2")), ST_HEADERS_OK);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("\r\n")), ST_HEADERS_OK); /* end of head: nothing stored */
    CHECK_EQ_INT(h.count, 4);
    CHECK(strcmp(st_headers_find(&h, "retry-after"), "7") == 0);
    CHECK(strcmp(st_headers_find(&h, "X-EMPTY"), "") == 0);
    CHECK(strcmp(st_headers_find(&h, "set-cookie"), "a=1") == 0); /* the first of a name */
    CHECK(st_headers_find(&h, "missing") == NULL);

    CHECK(st_headers_next(&h, &cursor, &name, &value));
    CHECK(strcmp(name, "Retry-After") == 0 && strcmp(value, "7") == 0); /* names as sent */
    CHECK(st_headers_next(&h, &cursor, &name, &value));
    CHECK(st_headers_next(&h, &cursor, &name, &value));
    CHECK(st_headers_next(&h, &cursor, &name, &value));
    CHECK(strcmp(value, "b=2") == 0);
    CHECK(!st_headers_next(&h, &cursor, &name, &value));

    /* rejected, and not stored */
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("no colon here\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE(": no name\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE(" folded: line\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("bad name: x\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("nul: a\0b\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("two: a\r\nx-injected: 1\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("bare-cr: a\rx-injected: 1\r\n")), ST_HEADERS_MALFORMED);
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("bare-lf: a\nx-injected: 1")), ST_HEADERS_MALFORMED);
    CHECK(st_headers_find(&h, "two") == NULL);
    CHECK_EQ_INT(h.count, 4);

    st_headers_reset(&h);
    CHECK_EQ_INT(h.count, 0);
    CHECK(st_headers_find(&h, "retry-after") == NULL);
    st_headers_free(&h);
}

static void test_limits(void)
{
    st_headers h;
    static char big[300 * 1024];
    size_t i;

    memset(&h, 0, sizeof h);
    h.max_bytes = 32;
    /* a header takes name + value + 2 bytes */
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("a: 0123456789\r\n")), ST_HEADERS_OK); /* 13 */
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("b: 0123456789\r\n")), ST_HEADERS_OK); /* 26 */
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("c: 1234\r\n")), ST_HEADERS_TOO_LARGE); /* 33 > 32 */
    CHECK_EQ_INT(st_headers_add_line(&h, LINE("c: 123\r\n")), ST_HEADERS_OK);          /* 32 fits */
    CHECK_EQ_INT(h.count, 3);
    st_headers_free(&h);

    /* the default limit: one 300 KB line is too large, whatever its shape */
    memset(&h, 0, sizeof h);
    memcpy(big, "x-big: ", 7);
    for (i = 7; i < sizeof big; i++)
        big[i] = 'a';
    CHECK_EQ_INT(st_headers_add_line(&h, big, sizeof big), ST_HEADERS_TOO_LARGE);
    CHECK_EQ_INT(h.count, 0);
    st_headers_free(&h);
}

int main(void)
{
    test_status_lines();
    test_header_lines();
    test_limits();
    return TEST_REPORT();
}
