/* HTTP-date (RFC 9110 section 5.6.7) and the retry hints servers send with 429/503/529.
 * Pure: "now" is passed in; no locale, no timegm. */
#ifndef STURDY_HTTPDATE_H
#define STURDY_HTTPDATE_H

#include <stddef.h>
#include <stdint.h>

/* Ceiling for any parsed hint: 10 years of 365 days. A hint this long is absurd,
 * but clamping keeps the arithmetic far from int64 overflow and still reads as
 * "beyond any cap" to the caller. */
#define ST_RETRY_AFTER_MAX_MS ((int64_t)315360000 * 1000)

/* Parse an HTTP-date in any of the three RFC 9110 forms:
 *   IMF-fixdate  "Sun, 06 Nov 1994 08:49:37 GMT"
 *   RFC 850      "Sunday, 06-Nov-94 08:49:37 GMT"
 *   asctime      "Sun Nov  6 08:49:37 1994"   (day is 2DIGIT or SP DIGIT)
 * Strict, as the grammar is case-sensitive: exact day and month names, exact
 * spacing, "GMT" where the form has it, hour 0-23, minute 0-59, second 0-60, day
 * valid for its month and year. Trailing OWS is allowed, leading is not. The
 * weekday must be a valid name but is not checked against the date: it is
 * redundant, and a wrong one does not make the intended instant unclear.
 * RFC 850 two-digit years: of the years ending in those digits, the latest whose
 * timestamp is not more than 50 years after now (calendar years, compared field
 * by field with now's date and time); so a date that would be more than 50 years
 * ahead is in the past century, as RFC 9110 requires. now_epoch_s only matters
 * for that form. Returns 1 and *epoch_s on success, else 0. */
int st_http_date_parse(const char *s, size_t len, int64_t now_epoch_s, int64_t *epoch_s);

/* Retry-After value: delta-seconds (1*DIGIT) or an HTTP-date, with optional OWS
 * around it. Returns 1 and *delay_ms > 0 for a usable positive delay; a date is
 * taken relative to now_epoch_ms (wall clock). Returns 0 for zero, negative,
 * fractional ("1.5" is not delta-seconds), garbage, empty, and dates at or before
 * now. Delays above ST_RETRY_AFTER_MAX_MS, from either form, are clamped to it. */
int st_retry_after_parse(const char *v, size_t len, int64_t now_epoch_ms, int64_t *delay_ms);

/* retry-after-ms (non-standard, sent by OpenAI and Anthropic): a decimal number of
 * ms, 1*DIGIT ["." *DIGIT] or "." 1*DIGIT, optional OWS around it. A fraction
 * rounds up to the next whole ms ("250.5" -> 251, "0.01" -> 1). Returns 1 and
 * *delay_ms > 0, clamped to ST_RETRY_AFTER_MAX_MS; 0 for zero, negative, exponents
 * and garbage. */
int st_retry_after_ms_parse(const char *v, size_t len, int64_t *delay_ms);

/* Calendar arithmetic shared with other date formats (RFC 3339):
 * days in a month of a (proleptic Gregorian) year, and days since 1970-01-01. */
int st_days_in_month(int64_t y, int m);
int64_t st_days_from_civil(int64_t y, int m, int d);

#endif
