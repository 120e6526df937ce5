/* fl_record: a pull reader for PostgreSQL's composite (row) text form, as record_out
 * writes it: "(1,,\"a b\",\"\",\"x\"\"y\\\\z\")". Pure C, no Lua, no libpq.
 *
 * The trigger drivers capture a row as the text of format('%s', NEW), which is
 * record_out over the row's live columns in attnum order; the consumer splits it here and
 * decodes each field by the column's type. */
#ifndef FL_RECORD_H
#define FL_RECORD_H
#include <stddef.h>

typedef enum { FL_REC_FIELD, FL_REC_NULL, FL_REC_END, FL_REC_ERROR } fl_rec_tok;

typedef struct {
  const char *p, *end;
  char *buf;          /* >= input length bytes: unescaped fields are written here */
  size_t used;        /* bytes of buf handed out so far */
  int state;          /* 0 before '(', 1 at a field, 2 after the last field */
  const char *err;
} fl_rec_reader;

void fl_rec_init(fl_rec_reader *r, const char *s, size_t len, char *buf);

/* The next field: FL_REC_FIELD with *val and *len (valid until the reader's buf is reused;
 * fields never overlap), FL_REC_NULL for an empty unquoted field, FL_REC_END after the
 * closing ')', FL_REC_ERROR with r->err on malformed input. "()" is one NULL field (a
 * one-column row whose value is NULL prints so; a zero-column row too: the caller, who
 * knows the column count, tells them apart). */
fl_rec_tok fl_rec_next(fl_rec_reader *r, const char **val, size_t *len);

/* A pull reader for one line of COPY ... TO STDOUT in text format (what PQgetCopyData
 * returns per row): fields separated by tabs, "\N" for NULL, backslash escapes (\b \f
 * \n \r \t \v, \ooo octal, \xhh hex, any other character taken literally), an optional
 * trailing newline. buf may be the line itself (unescaping never lengthens a field, so it
 * decodes in place). A line without a backslash (most) is not written to: its fields point
 * into the line itself, and buf may then be NULL. Tokens as fl_rec_next's; a line of no
 * characters is one empty field. */
typedef struct {
  const char *p, *end;
  char *buf;
  size_t used;
  int state;          /* 0 at a field, 1 after the last field, 3 after an error */
  int plain;          /* the line has no backslash */
  const char *err;
} fl_copy_reader;

void fl_copy_init(fl_copy_reader *r, const char *line, size_t len, char *buf);
fl_rec_tok fl_copy_next(fl_copy_reader *r, const char **val, size_t *len);

#endif
