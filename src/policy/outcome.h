/* Outcome classes: every finished attempt is classified once, and the class
 * decides whether it is retried, its backoff base and what the policies count. */
#ifndef STURDY_OUTCOME_H
#define STURDY_OUTCOME_H

typedef enum st_class {
    ST_CLASS_SUCCESS = 0,
    ST_CLASS_THROTTLED,
    ST_CLASS_OVERLOADED,
    ST_CLASS_TRANSIENT,
    ST_CLASS_TIMEOUT,
    ST_CLASS_FATAL,
    ST_CLASS_CANCELED,
    ST_CLASS_COUNT
} st_class;

typedef struct st_outcome {
    st_class cls;
    const char *kind; /* NULL for success */
} st_outcome;

/* Outcome of an HTTP status. */
st_outcome st_outcome_of_status(long status);

const char *st_class_name(st_class c);
int st_class_parse(const char *name, st_class *out);
/* Whether a class is retried when nothing overrides it. */
int st_class_retried_by_default(st_class c);

#endif
