/*
 * bare: the floor for sturdy's benchmarks, a plain libcurl client.
 *
 *   bare seq   URL N BODYFILE        N sequential POSTs on one reused easy handle
 *   bare multi URL N CONC BODYFILE   N POSTs, CONC in flight at once (curl_multi)
 *
 * Each POST sends BODYFILE as application/json without "Expect: 100-continue",
 * collects the response headers and body into growable buffers (as a real
 * client must before it can parse them) and then discards them. A transfer is
 * "ok" when curl succeeds and the status is 2xx.
 *
 * Prints one line: requests_per_s=<float> cpu_us=<float> ok=<n> failed=<n>
 * (cpu_us: user + system CPU time of this process per request, from getrusage)
 * Exit status: 0 when every request was ok, 1 when some failed, 2 on misuse.
 */
#define _POSIX_C_SOURCE 200809L

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

struct buf {
    char *p;
    size_t len, cap;
};

struct xfer {
    CURL *easy;
    struct buf head, body;
};

struct tally {
    long ok, failed;
    int reported; /* failures already described on stderr */
};

static int buf_add(struct buf *b, const char *s, size_t n)
{
    if (n > b->cap - b->len) {
        size_t cap = b->cap ? b->cap : 1024;
        char *p;
        while (n > cap - b->len) {
            if (cap > (size_t)-1 / 2)
                return 0;
            cap *= 2;
        }
        p = realloc(b->p, cap);
        if (p == NULL)
            return 0;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 1;
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *ud)
{
    size_t n = size * nmemb;
    return buf_add(ud, ptr, n) ? n : 0;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    struct buf b = { NULL, 0, 0 };
    char chunk[8192];
    size_t n;

    if (f == NULL) {
        fprintf(stderr, "bare: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (!buf_add(&b, chunk, n)) {
            fprintf(stderr, "bare: out of memory reading %s\n", path);
            fclose(f);
            free(b.p);
            return NULL;
        }
    }
    if (ferror(f)) {
        fprintf(stderr, "bare: cannot read %s\n", path);
        fclose(f);
        free(b.p);
        return NULL;
    }
    fclose(f);
    *len = b.len;
    return b.p ? b.p : calloc(1, 1);
}

static long parse_count(const char *s, const char *what)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < 1) {
        fprintf(stderr, "bare: %s must be a whole number >= 1, got '%s'\n", what, s);
        return -1;
    }
    return v;
}

static int xfer_init(struct xfer *x, const char *url, struct curl_slist *headers,
                     const char *body, size_t body_len)
{
    memset(x, 0, sizeof *x);
    x->easy = curl_easy_init();
    if (x->easy == NULL)
        return 0;
    curl_easy_setopt(x->easy, CURLOPT_URL, url);
    curl_easy_setopt(x->easy, CURLOPT_PRIVATE, (void *)x);
    curl_easy_setopt(x->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(x->easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(x->easy, CURLOPT_USERAGENT, "bare/1");
    curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(x->easy, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(x->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    curl_easy_setopt(x->easy, CURLOPT_HEADERFUNCTION, on_data);
    curl_easy_setopt(x->easy, CURLOPT_HEADERDATA, (void *)&x->head);
    curl_easy_setopt(x->easy, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(x->easy, CURLOPT_WRITEDATA, (void *)&x->body);
    return 1;
}

static void xfer_rewind(struct xfer *x)
{
    x->head.len = 0;
    x->body.len = 0;
}

static void xfer_free(struct xfer *x)
{
    if (x->easy)
        curl_easy_cleanup(x->easy);
    free(x->head.p);
    free(x->body.p);
}

/* Counts one finished transfer; the buffers are then discarded. */
static void finish(struct tally *t, struct xfer *x, CURLcode rc)
{
    long status = 0;

    if (rc == CURLE_OK)
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
    if (rc == CURLE_OK && status >= 200 && status < 300 && x->body.len > 0) {
        t->ok++;
        return;
    }
    t->failed++;
    if (t->reported < 3) {
        t->reported++;
        if (rc != CURLE_OK)
            fprintf(stderr, "bare: transfer failed: %s\n", curl_easy_strerror(rc));
        else
            fprintf(stderr, "bare: HTTP status %ld, %zu body bytes\n", status, x->body.len);
    }
}

static void run_seq(struct xfer *x, long n, struct tally *t)
{
    long i;
    for (i = 0; i < n; i++) {
        xfer_rewind(x);
        finish(t, x, curl_easy_perform(x->easy));
    }
}

static int run_multi(struct xfer *xs, long conc, long n, struct tally *t)
{
    CURLM *multi = curl_multi_init();
    long started = 0, i;
    int running = 0;

    if (multi == NULL)
        return 0;
    for (i = 0; i < conc && started < n; i++, started++) {
        xfer_rewind(&xs[i]);
        curl_multi_add_handle(multi, xs[i].easy);
    }
    for (;;) {
        CURLMsg *m;
        int left;
        CURLMcode mc = curl_multi_perform(multi, &running);

        if (mc != CURLM_OK) {
            fprintf(stderr, "bare: curl_multi_perform: %s\n", curl_multi_strerror(mc));
            break;
        }
        while ((m = curl_multi_info_read(multi, &left)) != NULL) {
            struct xfer *x = NULL;
            if (m->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
            finish(t, x, m->data.result);
            curl_multi_remove_handle(multi, x->easy);
            if (started < n) {
                started++;
                xfer_rewind(x);
                curl_multi_add_handle(multi, x->easy);
            }
        }
        if (t->ok + t->failed >= n)
            break;
        mc = curl_multi_poll(multi, NULL, 0, 1000, NULL);
        if (mc != CURLM_OK) {
            fprintf(stderr, "bare: curl_multi_poll: %s\n", curl_multi_strerror(mc));
            break;
        }
    }
    /* any transfer still attached (after an error) is dropped and counted */
    for (i = 0; i < conc; i++)
        curl_multi_remove_handle(multi, xs[i].easy);
    if (t->ok + t->failed < n)
        t->failed = n - t->ok;
    curl_multi_cleanup(multi);
    return 1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bare seq URL N BODYFILE\n"
            "       bare multi URL N CONC BODYFILE\n");
}

int main(int argc, char **argv)
{
    const char *url, *path;
    long n, conc = 1, i;
    int multi;
    char *body;
    size_t body_len = 0;
    struct curl_slist *headers = NULL, *h;
    struct xfer *xs;
    struct tally t = { 0, 0, 0 };
    double t0, elapsed, c0, cpu;
    int ok = 1;

    if (argc == 5 && strcmp(argv[1], "seq") == 0) {
        multi = 0;
    } else if (argc == 6 && strcmp(argv[1], "multi") == 0) {
        multi = 1;
    } else {
        usage();
        return 2;
    }
    url = argv[2];
    n = parse_count(argv[3], "N");
    if (multi)
        conc = parse_count(argv[4], "CONC");
    path = argv[argc - 1];
    if (n < 0 || conc < 0)
        return 2;
    if (conc > n)
        conc = n;
    body = read_file(path, &body_len);
    if (body == NULL)
        return 2;

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "bare: curl_global_init failed\n");
        return 2;
    }
    headers = curl_slist_append(NULL, "Content-Type: application/json");
    h = headers ? curl_slist_append(headers, "Expect:") : NULL;
    xs = calloc((size_t)conc, sizeof *xs);
    if (h == NULL || xs == NULL) {
        fprintf(stderr, "bare: out of memory\n");
        return 2;
    }
    for (i = 0; i < conc; i++) {
        if (!xfer_init(&xs[i], url, headers, body, body_len)) {
            fprintf(stderr, "bare: curl_easy_init failed\n");
            return 2;
        }
    }

    t0 = now_s();
    c0 = cpu_s();
    if (multi)
        ok = run_multi(xs, conc, n, &t);
    else
        run_seq(&xs[0], n, &t);
    elapsed = now_s() - t0;
    cpu = cpu_s() - c0;
    if (!ok) {
        fprintf(stderr, "bare: curl_multi_init failed\n");
        return 2;
    }

    printf("requests_per_s=%.1f cpu_us=%.2f ok=%ld failed=%ld\n",
           elapsed > 0 ? (double)t.ok / elapsed : 0.0, cpu * 1e6 / (double)n, t.ok, t.failed);

    for (i = 0; i < conc; i++)
        xfer_free(&xs[i]);
    free(xs);
    curl_slist_free_all(headers);
    free(body);
    curl_global_cleanup();
    return t.failed == 0 ? 0 : 1;
}
