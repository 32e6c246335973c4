/* Network diagnosis of one URL on libcurl, step by step: DNS (getaddrinfo,
 * timed, every address), TCP connect, TLS (protocol, cipher, the server's
 * certificate), and the time to the first byte of the reply.
 *
 * Contract:
 * - st_diag_run blocks for at most about 2 * timeout_ms plus the system
 *   resolver's own timeout (getaddrinfo takes none). It is for a command line
 *   or a health page, never for a request path or an nginx worker.
 * - Steps run in order and stop at the first that fails; a step after it is
 *   ST_DIAG_NOT_RUN. The step that failed carries the reason in r->error (DNS:
 *   the resolver's message; the others: libcurl's, plus r->os_errno for connect).
 * - DNS resolves the host the connection goes to: the proxy's when there is a
 *   proxy (a proxy resolves the target itself), else the URL's. Without a proxy
 *   the transfer connects to exactly those addresses (CURLOPT_RESOLVE), so the
 *   connect time excludes a second lookup.
 * - opts->proxy is used as given; NULL means a direct connection. The
 *   environment (http_proxy, ...) is never read here: the caller decides, so
 *   the proxy it reports is the one used.
 * - TLS verification is on (peer and host name). One GET is made with the
 *   opts' user agent and no other header; the reply body is not read beyond
 *   its first bytes. When verification fails, a second connection with
 *   CURLOPT_CONNECT_ONLY (nothing is sent on it) reads the certificate the
 *   server presents so it can be shown; r->cert_inspected says so and
 *   r->verify_result holds OpenSSL's verify code (X509_V_ERR_*).
 * - Times are seconds. Text fields are NUL-terminated, truncated to their size,
 *   control characters replaced by '?': servers choose what certificates say.
 * - Returns 1 when the steps ran (whatever they found), 0 when the options
 *   were unusable (a URL libcurl cannot parse, not http/https, out of memory):
 *   r->error says why and no step ran. */
#ifndef STURDY_DIAGNOSE_H
#define STURDY_DIAGNOSE_H

#define ST_DIAG_MAX_ADDRS 16
#define ST_DIAG_ADDR_LEN 46   /* INET6_ADDRSTRLEN */
#define ST_DIAG_NAME_LEN 256
#define ST_DIAG_TEXT_LEN 512

typedef enum st_diag_state {
    ST_DIAG_NOT_RUN = 0,
    ST_DIAG_OK,
    ST_DIAG_FAILED
} st_diag_state;

typedef struct st_diag_opts {
    const char *url;                /* http:// or https:// */
    const char *proxy;              /* proxy URL, or NULL: direct */
    const char *ca_file, *ca_path;  /* NULL: the system's CA store */
    const char *user_agent;         /* NULL: libcurl sends none */
    long connect_timeout_ms;        /* > 0 */
    long timeout_ms;                /* > 0: bounds each connection */
} st_diag_opts;

typedef struct st_diag_report {
    /* the target, from the URL */
    char scheme[8];
    char host[ST_DIAG_NAME_LEN];    /* IPv6 literals without brackets */
    long port;
    int tls_wanted;                 /* https */

    /* DNS */
    st_diag_state dns;
    double dns_s;
    char dns_name[ST_DIAG_NAME_LEN]; /* the name resolved: proxy host or target host */
    long dns_port;
    int via_proxy;
    int naddrs;                     /* addresses kept (at most ST_DIAG_MAX_ADDRS) */
    int naddrs_total;               /* addresses the resolver gave */
    char addrs[ST_DIAG_MAX_ADDRS][ST_DIAG_ADDR_LEN];

    /* TCP connect */
    st_diag_state connect;
    double connect_s;
    char ip[ST_DIAG_ADDR_LEN];      /* the address connected to (or tried last) */
    long ip_port;
    long os_errno;                  /* errno of a failed connect, else 0 */

    /* TLS */
    st_diag_state tls;
    double tls_s;
    char protocol[32];              /* "TLSv1.3" */
    char cipher[96];                /* "TLS_AES_256_GCM_SHA384" */
    char subject[ST_DIAG_TEXT_LEN]; /* of the server's own certificate */
    char issuer[ST_DIAG_TEXT_LEN];
    char expire[64];                /* as libcurl prints it */
    int have_days;                  /* expire parsed */
    long days_left;                 /* whole days until it expires; negative: expired */
    int cert_inspected;             /* certificate read on the unverified second connection */
    long verify_result;             /* X509_V_OK (0) or an X509_V_ERR_* code */

    /* first byte */
    st_diag_state first_byte;
    double first_byte_s;
    long status;                    /* HTTP status, 0 if none came */
    char http_version[8];           /* "1.1", "2", "3" */

    double total_s;
    int curl_code;                  /* CURLcode of the transfer */
    char error[ST_DIAG_TEXT_LEN];   /* why the failed step failed */
} st_diag_report;

int st_diag_run(const st_diag_opts *opts, st_diag_report *r);

/* Days from now_epoch_s until a certificate date as libcurl's OpenSSL backend
 * prints it ("Nov 28 20:57:28 2036 GMT", day space-padded) or GnuTLS's
 * ("2036-11-28 20:57:28 GMT"), rounded down (an hour left is day 0, an hour
 * past is day -1). Returns 1 and *days, or 0 when text is neither form or its
 * fields are out of range. */
int st_diag_days_until(const char *text, long long now_epoch_s, long *days);

#endif
