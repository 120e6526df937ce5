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

void fl_copy_init(fl_copy_reader *r, const char *line, size_t len, char *buf) {
  if (len > 0 && line[len - 1] == '\n') len--;
  r->p = line;
  r->end = line + len;
  r->buf = buf;
  r->used = 0;
  r->state = 0;
  r->plain = memchr(line, '\\', len) == NULL;
  r->err = NULL;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

fl_rec_tok fl_copy_next(fl_copy_reader *r, const char **val, size_t *len) {
  if (r->state == 1) return FL_REC_END;
  if (r->state == 3) return FL_REC_ERROR;
  const char *tab = memchr(r->p, '\t', (size_t)(r->end - r->p));
  const char *fend = tab ? tab : r->end;
  if (r->plain) {
    /* No backslash in the line: no NULL, no escape; the field is where it is. */
    *val = r->p;
    *len = (size_t)(fend - r->p);
    r->p = fend;
    if (tab) r->p++; else r->state = 1;
    return FL_REC_FIELD;
  }
  /* The output never runs ahead of the input: in place is safe. */
  char *out = r->buf + r->used;
  size_t n = 0;
  if (fend - r->p == 2 && r->p[0] == '\\' && r->p[1] == 'N') {
    r->p = fend;
    if (tab) r->p++; else r->state = 1;
    return FL_REC_NULL;
  }
  if (!memchr(r->p, '\\', (size_t)(fend - r->p))) {
    /* No escape (most fields): moved as a block. */
    n = (size_t)(fend - r->p);
    if (out != r->p) memmove(out, r->p, n);
    r->p = fend;
  }
  while (r->p < r->end && *r->p != '\t') {
    char c = *r->p++;
    if (c != '\\') { out[n++] = c; continue; }
    if (r->p >= r->end) { r->err = "backslash at the end of the line"; r->state = 3; return FL_REC_ERROR; }
    c = *r->p++;
    switch (c) {
    case 'b': out[n++] = '\b'; break;
    case 'f': out[n++] = '\f'; break;
    case 'n': out[n++] = '\n'; break;
    case 'r': out[n++] = '\r'; break;
    case 't': out[n++] = '\t'; break;
    case 'v': out[n++] = '\v'; break;
    case 'x': {
      int h = r->p < r->end ? hexval(*r->p) : -1;
      if (h < 0) { out[n++] = 'x'; break; }
      r->p++;
      int h2 = r->p < r->end ? hexval(*r->p) : -1;
      if (h2 >= 0) { h = h * 16 + h2; r->p++; }
      out[n++] = (char)h;
      break;
    }
    default:
      if (c >= '0' && c <= '7') {
        int v = c - '0';
        for (int k = 0; k < 2 && r->p < r->end && *r->p >= '0' && *r->p <= '7'; k++) v = v * 8 + (*r->p++ - '0');
        out[n++] = (char)v;
      } else {
        out[n++] = c;
      }
    }
  }
  if (r->p < r->end) r->p++;            /* the tab */
  else r->state = 1;
  r->used += n;
  *val = out;
  *len = n;
  return FL_REC_FIELD;
}
