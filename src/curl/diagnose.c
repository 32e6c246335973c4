/* Network diagnosis of one URL: see diagnose.h for the contract. */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <curl/curl.h>

#include "diagnose.h"
#include "httpdate.h"

#define US_PER_S 1e6

/* ---- text ------------------------------------------------------------------ */

/* Copies at most len bytes of src into dst (size n), control characters
 * replaced: certificate fields and error texts come from the network. */
static void copy_text(char *dst, size_t n, const char *src, size_t len)
{
    size_t i;

    if (n == 0)
        return;
    if (src == NULL)
        len = 0;
    if (len > n - 1)
        len = n - 1;
    for (i = 0; i < len && src[i] != '\0'; i++) {
        unsigned char ch = (unsigned char)src[i];
        dst[i] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    dst[i] = '\0';
}

static void copy_str(char *dst, size_t n, const char *src)
{
    copy_text(dst, n, src, src ? strlen(src) : 0);
}

static int starts_with(const char *s, size_t len, const char *prefix)
{
    size_t plen = strlen(prefix);
    return len >= plen && memcmp(s, prefix, plen) == 0;
}

/* "[::1]" -> "::1" */
static void copy_host(char *dst, size_t n, const char *host)
{
    size_t len = strlen(host);
    if (len >= 2 && host[0] == '[' && host[len - 1] == ']')
        copy_text(dst, n, host + 1, len - 2);
    else
        copy_text(dst, n, host, len);
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

/* ---- certificate dates ---------------------------------------------------- */

/* Reads exactly ndigits digits (a leading space counts as 0 when pad is set). */
static int read_number(const char **p, int ndigits, int pad, long *out)
{
    long v = 0;
    int i;
    for (i = 0; i < ndigits; i++) {
        char ch = (*p)[i];
        if (ch == ' ' && pad && i < ndigits - 1)
            continue;
        if (ch < '0' || ch > '9')
            return 0;
        v = v * 10 + (ch - '0');
    }
    *p += ndigits;
    *out = v;
    return 1;
}

static int expect_char(const char **p, char ch)
{
    if (**p != ch)
        return 0;
    (*p)++;
    return 1;
}

static int read_clock(const char **p, long *h, long *mi, long *s)
{
    return read_number(p, 2, 0, h) && expect_char(p, ':') && read_number(p, 2, 0, mi)
        && expect_char(p, ':') && read_number(p, 2, 0, s);
}

int st_diag_days_until(const char *text, long long now_epoch_s, long *days)
{
    static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
    const char *p = text;
    long y, m = 0, d, h, mi, s;
    long long at, diff;

    if (text == NULL)
        return 0;
    if (p[0] >= '0' && p[0] <= '9') {
        /* GnuTLS: 2036-11-28 20:57:28 */
        if (!(read_number(&p, 4, 0, &y) && expect_char(&p, '-') && read_number(&p, 2, 0, &m)
              && expect_char(&p, '-') && read_number(&p, 2, 0, &d) && expect_char(&p, ' ')
              && read_clock(&p, &h, &mi, &s)))
            return 0;
    } else {
        /* OpenSSL: Nov 28 20:57:28 2036 GMT, day space-padded */
        int i;
        for (i = 0; i < 12; i++) {
            if (strncmp(p, months + 3 * i, 3) == 0) {
                m = i + 1;
                break;
            }
        }
        if (m == 0)
            return 0;
        p += 3;
        if (!(expect_char(&p, ' ') && read_number(&p, 2, 1, &d) && expect_char(&p, ' ')
              && read_clock(&p, &h, &mi, &s) && expect_char(&p, ' ') && read_number(&p, 4, 0, &y)))
            return 0;
    }
    if (m < 1 || m > 12 || d < 1 || d > st_days_in_month(y, (int)m) || h > 23 || mi > 59 || s > 60)
        return 0;
    at = (long long)st_days_from_civil(y, (int)m, (int)d) * 86400 + h * 3600 + mi * 60 + s;
    diff = at - now_epoch_s;
    /* floor division: an hour past the date is day -1, not day 0 */
    *days = (long)(diff >= 0 ? diff / 86400 : -((-diff + 86399) / 86400));
    return 1;
}

/* ---- DNS -------------------------------------------------------------------- */

static int is_ip_literal(const char *host)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

static void resolve(st_diag_report *r)
{
    struct addrinfo hints, *res = NULL, *ai;
    struct timespec t0;
    char port[16];
    int rc;

    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(port, sizeof port, "%ld", r->dns_port);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = getaddrinfo(r->dns_name, port, &hints, &res);
    r->dns_s = seconds_since(&t0);
    if (rc != 0) {
        r->dns = ST_DIAG_FAILED;
        copy_str(r->error, sizeof r->error, gai_strerror(rc));
        return;
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        char text[ST_DIAG_ADDR_LEN + 16]; /* room for a %scope */
        int i, seen = 0;
        if (getnameinfo(ai->ai_addr, ai->ai_addrlen, text, sizeof text, NULL, 0, NI_NUMERICHOST) != 0)
            continue;
        for (i = 0; i < r->naddrs; i++)
            seen |= strcmp(r->addrs[i], text) == 0;
        if (seen)
            continue;
        r->naddrs_total++;
        if (r->naddrs < ST_DIAG_MAX_ADDRS)
            copy_str(r->addrs[r->naddrs++], ST_DIAG_ADDR_LEN, text);
    }
    freeaddrinfo(res);
    if (r->naddrs == 0) {
        r->dns = ST_DIAG_FAILED;
        copy_str(r->error, sizeof r->error, "the resolver returned no usable address");
        return;
    }
    r->dns = ST_DIAG_OK;
}

/* "host:port:addr,[v6addr],..." so the transfer connects to what DNS gave. */
static struct curl_slist *resolve_entry(const st_diag_report *r)
{
    char line[ST_DIAG_NAME_LEN + 32 + ST_DIAG_MAX_ADDRS * (ST_DIAG_ADDR_LEN + 3)];
    size_t used;
    int i, n = 0;

    used = (size_t)snprintf(line, sizeof line, "%s:%ld:", r->dns_name, r->dns_port);
    for (i = 0; i < r->naddrs && used < sizeof line; i++) {
        int v6 = strchr(r->addrs[i], ':') != NULL;
        if (strchr(r->addrs[i], '%') != NULL)
            continue; /* a scoped link-local address cannot be written here */
        used += (size_t)snprintf(line + used, sizeof line - used, "%s%s%s%s", n++ ? "," : "",
                                 v6 ? "[" : "", r->addrs[i], v6 ? "]" : "");
    }
    if (n == 0 || used >= sizeof line)
        return NULL; /* curl resolves the name itself */
    return curl_slist_append(NULL, line);
}

/* ---- the transfer --------------------------------------------------------- */

typedef struct transfer {
    st_diag_report *r;
    int got_body;
    struct timespec started;
    double connected_s;   /* since started, when TCP (and a proxy tunnel) was up; < 0: not seen */
} transfer;

/* TLS protocol and cipher from libcurl's "SSL connection using TLSv1.3 /
 * TLS_AES_256_GCM_SHA384" line: the one backend-neutral place that says both
 * without linking the TLS library (CURLINFO_TLS_SSL_PTR would need OpenSSL's
 * headers). Nothing else of the debug stream is kept. */
static int on_debug(CURL *c, curl_infotype type, char *data, size_t size, void *ud)
{
    static const char prefix[] = "SSL connection using ";
    transfer *t = ud;
    const char *p, *end, *sep;
    (void)c;

    /* libcurl 7.88 sets no connect mark when TLS then fails: the first TLS
     * bytes out (or its "Connected to" line) say when TCP was up */
    if (t->connected_s < 0 && (type == CURLINFO_SSL_DATA_OUT
                               || (type == CURLINFO_TEXT && starts_with(data, size, "Connected to "))))
        t->connected_s = seconds_since(&t->started);
    if (type != CURLINFO_TEXT || !starts_with(data, size, prefix))
        return 0;
    p = data + sizeof prefix - 1;
    end = data + size;
    while (end > p && (end[-1] == '\n' || end[-1] == '\r'))
        end--;
    for (sep = p; sep + 3 <= end && memcmp(sep, " / ", 3) != 0; sep++)
        ;
    if (sep + 3 > end)
        return 0;
    copy_text(t->r->protocol, sizeof t->r->protocol, p, (size_t)(sep - p));
    p = sep + 3;
    for (sep = p; sep + 3 <= end && memcmp(sep, " / ", 3) != 0; sep++)
        ;
    copy_text(t->r->cipher, sizeof t->r->cipher, p, (size_t)((sep + 3 <= end ? sep : end) - p));
    return 0;
}

/* The first bytes of the body end the transfer: the first byte is what counts. */
static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    transfer *t = ud;
    (void)p;
    if (size * n == 0)
        return 0;
    t->got_body = 1;
    return 0;
}

static void read_certinfo(CURL *c, st_diag_report *r)
{
    struct curl_certinfo *ci = NULL;
    struct curl_slist *s;
    time_t now;

    if (curl_easy_getinfo(c, CURLINFO_CERTINFO, &ci) != CURLE_OK || ci == NULL || ci->num_of_certs < 1)
        return;
    for (s = ci->certinfo[0]; s != NULL; s = s->next) {
        const char *d = s->data;
        size_t len = strlen(d);
        if (starts_with(d, len, "Subject:"))
            copy_str(r->subject, sizeof r->subject, d + 8);
        else if (starts_with(d, len, "Issuer:"))
            copy_str(r->issuer, sizeof r->issuer, d + 7);
        else if (starts_with(d, len, "Expire date:"))
            copy_str(r->expire, sizeof r->expire, d + 12);
    }
    now = time(NULL);
    r->have_days = st_diag_days_until(r->expire, (long long)now, &r->days_left);
}

static CURL *new_easy(const st_diag_opts *o, transfer *t, struct curl_slist *resolve_list, char *errbuf)
{
    CURL *c = curl_easy_init();
    if (c == NULL)
        return NULL;
    curl_easy_setopt(c, CURLOPT_URL, o->url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, o->timeout_ms);
    curl_easy_setopt(c, CURLOPT_PROXY, o->proxy ? o->proxy : ""); /* "": no proxy, not the environment's */
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
    if (o->ca_file)
        curl_easy_setopt(c, CURLOPT_CAINFO, o->ca_file);
    if (o->ca_path)
        curl_easy_setopt(c, CURLOPT_CAPATH, o->ca_path);
    if (o->user_agent)
        curl_easy_setopt(c, CURLOPT_USERAGENT, o->user_agent);
    curl_easy_setopt(c, CURLOPT_CERTINFO, 1L);
    curl_easy_setopt(c, CURLOPT_VERBOSE, 1L);
    curl_easy_setopt(c, CURLOPT_DEBUGFUNCTION, on_debug);
    curl_easy_setopt(c, CURLOPT_DEBUGDATA, t);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    if (resolve_list)
        curl_easy_setopt(c, CURLOPT_RESOLVE, resolve_list);
    return c;
}

static int is_tls_error(CURLcode code)
{
    switch (code) {
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED:
        return 1;
    default:
        return 0;
    }
}

/* After a failed verification: reads the certificate the server presents on a
 * connection that sends nothing (CONNECT_ONLY), so the report can say who it
 * names and who signed it. Verification is off on this connection only. */
static void inspect_certificate(const st_diag_opts *o, st_diag_report *r, struct curl_slist *resolve_list)
{
    char errbuf[CURL_ERROR_SIZE];
    transfer t;
    CURL *c;
    long verify = 0;

    memset(&t, 0, sizeof t);
    t.r = r;
    t.connected_s = 0; /* not measured here */
    errbuf[0] = '\0';
    c = new_easy(o, &t, resolve_list, errbuf);
    if (c == NULL)
        return;
    curl_easy_setopt(c, CURLOPT_CONNECT_ONLY, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
    if (curl_easy_perform(c) == CURLE_OK) {
        read_certinfo(c, r);
        r->cert_inspected = r->subject[0] != '\0' || r->issuer[0] != '\0';
        if (r->verify_result == 0 && curl_easy_getinfo(c, CURLINFO_SSL_VERIFYRESULT, &verify) == CURLE_OK)
            r->verify_result = verify;
    }
    curl_easy_cleanup(c);
}

static const char *version_text(long v)
{
    switch (v) {
    case CURL_HTTP_VERSION_1_0: return "1.0";
    case CURL_HTTP_VERSION_1_1: return "1.1";
    case CURL_HTTP_VERSION_2_0: return "2";
    case CURL_HTTP_VERSION_3: return "3";
    default: return "";
    }
}

/* Which step a failed transfer stopped in, from its code and curl's marks. */
static void attribute_failure(st_diag_report *r, CURLcode code, curl_off_t t_conn, curl_off_t t_app)
{
    if (code == CURLE_COULDNT_RESOLVE_HOST || code == CURLE_COULDNT_RESOLVE_PROXY) {
        r->dns = ST_DIAG_FAILED;
    } else if (is_tls_error(code)) {
        r->connect = ST_DIAG_OK;
        r->tls = ST_DIAG_FAILED;
    } else if (code == CURLE_COULDNT_CONNECT || t_conn == 0) {
        r->connect = ST_DIAG_FAILED;
    } else if (r->tls_wanted && t_app == 0) {
        /* connected, but neither TLS nor an error of its own: a proxy tunnel
         * refused (CONNECT answered non-2xx) counts as the connection; else TLS */
        r->connect = r->via_proxy ? ST_DIAG_FAILED : ST_DIAG_OK;
        r->tls = r->via_proxy ? ST_DIAG_NOT_RUN : ST_DIAG_FAILED;
    } else {
        r->connect = ST_DIAG_OK;
        if (r->tls_wanted)
            r->tls = ST_DIAG_OK;
        r->first_byte = ST_DIAG_FAILED;
    }
}

static void run_transfer(const st_diag_opts *o, st_diag_report *r)
{
    char errbuf[CURL_ERROR_SIZE];
    struct curl_slist *resolve_list = NULL;
    curl_off_t t_dns = 0, t_conn = 0, t_app = 0, t_pre = 0, t_start = 0, t_total = 0;
    long status = 0, version = 0, os_errno = 0, port = 0, verify = 0;
    char *ip = NULL;
    transfer t;
    CURLcode code;
    CURL *c;

    memset(&t, 0, sizeof t);
    t.r = r;
    t.connected_s = -1;
    errbuf[0] = '\0';
    if (!r->via_proxy && !is_ip_literal(r->dns_name))
        resolve_list = resolve_entry(r);
    c = new_easy(o, &t, resolve_list, errbuf);
    if (c == NULL) {
        curl_slist_free_all(resolve_list);
        r->connect = ST_DIAG_FAILED;
        copy_str(r->error, sizeof r->error, "out of memory");
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &t.started);
    code = curl_easy_perform(c);
    if (code == CURLE_WRITE_ERROR && t.got_body)
        code = CURLE_OK; /* we ended it at the first body bytes */
    r->curl_code = (int)code;

    curl_easy_getinfo(c, CURLINFO_NAMELOOKUP_TIME_T, &t_dns);
    curl_easy_getinfo(c, CURLINFO_CONNECT_TIME_T, &t_conn);
    curl_easy_getinfo(c, CURLINFO_APPCONNECT_TIME_T, &t_app);
    curl_easy_getinfo(c, CURLINFO_PRETRANSFER_TIME_T, &t_pre);
    curl_easy_getinfo(c, CURLINFO_STARTTRANSFER_TIME_T, &t_start);
    curl_easy_getinfo(c, CURLINFO_TOTAL_TIME_T, &t_total);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(c, CURLINFO_HTTP_VERSION, &version);
    curl_easy_getinfo(c, CURLINFO_OS_ERRNO, &os_errno);
    if (curl_easy_getinfo(c, CURLINFO_PRIMARY_IP, &ip) == CURLE_OK && ip != NULL)
        copy_str(r->ip, sizeof r->ip, ip);
    curl_easy_getinfo(c, CURLINFO_PRIMARY_PORT, &port);
    if (curl_easy_getinfo(c, CURLINFO_SSL_VERIFYRESULT, &verify) == CURLE_OK)
        r->verify_result = verify;
    r->ip_port = port;
    r->status = status;
    copy_str(r->http_version, sizeof r->http_version, version_text(version));
    r->total_s = (double)t_total / US_PER_S;

    if (code == CURLE_OK) {
        r->connect = ST_DIAG_OK;
        if (r->tls_wanted) {
            r->tls = ST_DIAG_OK;
            read_certinfo(c, r);
        }
        r->first_byte = ST_DIAG_OK;
    } else {
        attribute_failure(r, code, t_conn, t_app);
        copy_str(r->error, sizeof r->error, errbuf[0] ? errbuf : curl_easy_strerror(code));
        if (r->connect == ST_DIAG_FAILED)
            r->os_errno = os_errno;
    }
    /* phase durations from curl's cumulative marks; a failed phase runs to the end */
    if (t_conn == 0 && t.connected_s >= 0 && t.connected_s * US_PER_S <= (double)t_total)
        t_conn = (curl_off_t)(t.connected_s * US_PER_S);
    if (r->connect == ST_DIAG_OK)
        r->connect_s = (double)(t_conn - t_dns) / US_PER_S;
    else if (r->connect == ST_DIAG_FAILED)
        r->connect_s = (double)(t_total - t_dns) / US_PER_S;
    if (r->tls == ST_DIAG_OK)
        r->tls_s = (double)(t_app - t_conn) / US_PER_S;
    else if (r->tls == ST_DIAG_FAILED)
        r->tls_s = (double)(t_total - t_conn) / US_PER_S;
    if (r->first_byte == ST_DIAG_OK)
        r->first_byte_s = (double)(t_start - t_pre) / US_PER_S;
    else if (r->first_byte == ST_DIAG_FAILED)
        r->first_byte_s = (double)(t_total - (t_pre ? t_pre : (t_app ? t_app : t_conn))) / US_PER_S;
    curl_easy_cleanup(c);

    if (code == CURLE_PEER_FAILED_VERIFICATION)
        inspect_certificate(o, r, resolve_list);
    curl_slist_free_all(resolve_list);
}

/* ---- the run ---------------------------------------------------------------- */

static int parse_target(const st_diag_opts *o, st_diag_report *r)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL;
    int ok = 0;

    if (u == NULL) {
        copy_str(r->error, sizeof r->error, "out of memory");
        return 0;
    }
    if (curl_url_set(u, CURLUPART_URL, o->url, 0) != CURLUE_OK
        || curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK
        || curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK
        || curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK) {
        copy_str(r->error, sizeof r->error, "the URL cannot be parsed");
    } else if (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0) {
        copy_str(r->error, sizeof r->error, "the URL must be http:// or https://");
    } else if (strlen(host) >= sizeof r->host) {
        copy_str(r->error, sizeof r->error, "the host name is longer than DNS allows");
    } else {
        copy_str(r->scheme, sizeof r->scheme, scheme);
        copy_host(r->host, sizeof r->host, host);
        r->port = strtol(port, NULL, 10);
        r->tls_wanted = strcmp(scheme, "https") == 0;
        ok = 1;
    }
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return ok;
}

/* The proxy's host and port: what the connection goes to. libcurl's default
 * proxy port is 1080, 443 for an https:// proxy. */
static int parse_proxy(const st_diag_opts *o, st_diag_report *r)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL;
    int ok = 0;

    if (u == NULL) {
        copy_str(r->error, sizeof r->error, "out of memory");
        return 0;
    }
    if (curl_url_set(u, CURLUPART_URL, o->proxy, CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK
        || curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK
        || curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
        copy_str(r->error, sizeof r->error, "the proxy URL cannot be parsed");
    } else if (strlen(host) >= sizeof r->dns_name) {
        copy_str(r->error, sizeof r->error, "the proxy's host name is longer than DNS allows");
    } else {
        copy_host(r->dns_name, sizeof r->dns_name, host);
        if (curl_url_get(u, CURLUPART_PORT, &port, 0) == CURLUE_OK)
            r->dns_port = strtol(port, NULL, 10);
        else
            r->dns_port = strcmp(scheme, "https") == 0 ? 443 : 1080;
        ok = 1;
    }
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return ok;
}

int st_diag_run(const st_diag_opts *o, st_diag_report *r)
{
    memset(r, 0, sizeof *r);
    if (o->url == NULL || !parse_target(o, r))
        return 0;
    if (o->proxy != NULL && o->proxy[0] != '\0') {
        r->via_proxy = 1;
        if (!parse_proxy(o, r))
            return 0;
    } else {
        copy_str(r->dns_name, sizeof r->dns_name, r->host);
        r->dns_port = r->port;
    }
    resolve(r);
    if (r->dns == ST_DIAG_OK)
        run_transfer(o, r);
    r->total_s += r->dns_s;
    return 1;
}
