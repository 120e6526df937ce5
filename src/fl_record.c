/* fl_record: composite (row) text form reader; see fl_record.h. The grammar is
 * record_in's: fields separated by ',', inside '(' ... ')'; a field may mix bare and
 * double-quoted runs; inside quotes "" is a quote; a backslash takes the next character
 * literally anywhere; a field with no characters at all (not even "") is NULL. */
#include <string.h>
#include "fl_record.h"

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

void fl_rec_init(fl_rec_reader *r, const char *s, size_t len, char *buf) {
  r->p = s;
  r->end = s + len;
  r->buf = buf;
  r->used = 0;
  r->state = 0;
  r->err = NULL;
}

static fl_rec_tok fail(fl_rec_reader *r, const char *msg) {
  r->err = msg;
  r->state = 3;
  return FL_REC_ERROR;
}

fl_rec_tok fl_rec_next(fl_rec_reader *r, const char **val, size_t *len) {
  if (r->state == 3) return FL_REC_ERROR;
  if (r->state == 2) {
    while (r->p < r->end && is_space(*r->p)) r->p++;
    if (r->p != r->end) return fail(r, "junk after the closing parenthesis");
    r->state = 4;
    return FL_REC_END;
  }
  if (r->state == 4) return FL_REC_END;
  if (r->state == 0) {
    while (r->p < r->end && is_space(*r->p)) r->p++;
    if (r->p >= r->end || *r->p != '(') return fail(r, "missing left parenthesis");
    r->p++;
    r->state = 1;
  }
  char *out = r->buf + r->used;
  size_t n = 0;
  int any = 0, quoted = 0;
  for (;;) {
    if (r->p >= r->end) return fail(r, "unexpected end of input");
    char c = *r->p;
    if (quoted) {
      r->p++;
      if (c == '\\') {
        if (r->p >= r->end) return fail(r, "unexpected end of input");
        out[n++] = *r->p++;
      } else if (c == '"') {
        if (r->p < r->end && *r->p == '"') { out[n++] = '"'; r->p++; }
        else quoted = 0;
      } else {
        out[n++] = c;
      }
      continue;
    }
    if (c == ',' || c == ')') {
      r->p++;
      if (c == ')') r->state = 2;
      break;
    }
    r->p++;
    any = 1;
    if (c == '"') quoted = 1;
    else if (c == '\\') {
      if (r->p >= r->end) return fail(r, "unexpected end of input");
      out[n++] = *r->p++;
    } else {
      out[n++] = c;
    }
  }
  if (!any) return FL_REC_NULL;
  r->used += n;
  *val = out;
  *len = n;
  return FL_REC_FIELD;
}
