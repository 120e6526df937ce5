/* lconn: libpq connections for Lua ("flash.conn"), query results and trigger payloads
 * decoded into Lua rows through the shared value decoder (lvalue.c). */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <math.h>
#include <libpq-fe.h>
#include <lua.h>
#include <lauxlib.h>
#include "lconn.h"
#include "lerr.h"
#include "lvalue.h"
#include "fl_json.h"
#include "fl_record.h"
#include "fl_pqconn.h"

#define CONN_MT "flash.conn"
#define LAYOUT_MT "flash.layout"

#define NOTICE_MAX 16

/* Server notices are kept here, not printed by libpq, so the Lua side can log them
 * through flash.log with the right level. */
/* Types of query result columns that are not built in: resolved once per connection from
 * the catalog (domains to their base type, arrays to their element's base type), so
 * client:query decodes values as events do. */
#define TYPE_CACHE_MAX 256

typedef struct {
  PGconn *pg;
  int nnotices;
  char *notices[NOTICE_MAX];
  int ntypes;
  fl_coltype types[TYPE_CACHE_MAX];   /* oid: the result column's type; the rest resolved */
  uint32_t type_oid[TYPE_CACHE_MAX];
} fl_conn;

static void on_notice(void *arg, const char *message) {
  fl_conn *c = arg;
  if (c->nnotices >= NOTICE_MAX) return;   /* a flood of notices: keep the first ones */
  c->notices[c->nnotices] = strdup(message);
  if (c->notices[c->nnotices]) c->nnotices++;
}

static void free_notices(fl_conn *c) {
  for (int i = 0; i < c->nnotices; i++) free(c->notices[i]);
  c->nnotices = 0;
}

/* A listener's column layout: names and types in payload order, or, for batch payloads
 * (whose rows carry the union of several listeners' columns), with each column's
 * position in the row. */
typedef struct {
  int n;
  int flags;
  char **names;
  size_t *namelen;
  fl_coltype *types;
  int *pos;           /* 0-based position of column i in a batch row */
} fl_layout;

/* Canonical text forms whoever reads: the same settings the trigger functions pin. Writable
 * transactions: flashlua's own objects (schema, triggers, publication, the extension's
 * registry) must be writable even where ALTER ROLE/DATABASE ... SET
 * default_transaction_read_only = on makes read-only the default of the application's
 * sessions (a default any session may change; a hot standby stays read-only). And no
 * explicit pg_catalog after another schema on the search_path (pg_catalog is searched
 * first unless the path names it later): a search_path set in the DSN or by ALTER
 * ROLE/DATABASE ... SET that puts another role's schema before it would let that role's
 * functions and operators of the same signatures stand in for pg_catalog's in flashlua's
 * queries. Such a path is set again without pg_catalog (its schemas as they resolve now),
 * so pg_catalog is searched first and new objects still go where they went. */
static const char *const canonical_settings =
  "SELECT CASE WHEN (pg_catalog.current_schemas(true))[1] OPERATOR(pg_catalog.=) 'pg_catalog' THEN NULL"
  " ELSE pg_catalog.set_config('search_path', COALESCE((SELECT pg_catalog.string_agg("
  "pg_catalog.quote_ident(u.s), ', ' ORDER BY u.i) FROM pg_catalog.unnest(pg_catalog.current_schemas(false))"
  " WITH ORDINALITY AS u(s, i) WHERE u.s OPERATOR(pg_catalog.<>) 'pg_catalog'), ''), false) END;"
  " SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres';"
  " SET extra_float_digits = 3; SET bytea_output = 'hex'; SET client_min_messages = warning;"
  " SET default_transaction_read_only = off";

static fl_conn *check_conn(lua_State *L, int idx) {
  fl_conn *c = luaL_checkudata(L, idx, CONN_MT);
  if (c->pg == NULL) luaL_error(L, "attempt to use a closed connection");
  return c;
}

/* Whether pg is still connected after a failure that carried no SQLSTATE. libpq leaves
 * the status CONNECTION_OK when sending the query failed (EPIPE, ECONNRESET: the server
 * went away, e.g. pg_ctl restart -m immediate) and the failure is "server closed the
 * connection unexpectedly"; it notices the closed socket only at its next read. Reading
 * now (never blocks) makes the status say so, so the caller sees kind "connection" and
 * conn:ok() false, and reconnects instead of taking it for a query's error. */
static int still_connected(PGconn *pg) {
  if (pg == NULL || PQstatus(pg) != CONNECTION_OK) return 0;
  if (!PQconsumeInput(pg)) return 0;
  return PQstatus(pg) == CONNECTION_OK;
}

/* A failure of c's connection: its message, kind "connection" once the connection is
 * bad, else "protocol" (a result libpq or the server gave in an unexpected shape). */
static int conn_fail(lua_State *L, fl_conn *c, const char *msg) {
  lua_pushstring(L, msg);   /* msg may be libpq's error buffer, which the read may grow */
  const char *kind = still_connected(c->pg) ? "protocol" : "connection";
  return fl_fail(L, lua_tostring(L, -1), kind);
}

/* core.connect(dsn) -> conn | nil, err, kind */
static int l_connect(lua_State *L) {
  const char *dsn = luaL_optstring(L, 1, "");
  const char *keys[] = { "dbname", "fallback_application_name", "client_encoding", NULL };
  const char *vals[] = { dsn, "flashlua", "UTF8", NULL };
  fl_conn *c = lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  luaL_getmetatable(L, CONN_MT);
  lua_setmetatable(L, -2);
  c->pg = PQconnectdbParams(keys, vals, 1);
  if (c->pg == NULL) return fl_fail(L, "out of memory", "memory");
  PQsetNoticeProcessor(c->pg, on_notice, c);
  if (PQstatus(c->pg) != CONNECTION_OK) {
    lua_pushfstring(L, "cannot connect to PostgreSQL: %s", PQerrorMessage(c->pg));
    PQfinish(c->pg);
    c->pg = NULL;
    return fl_fail(L, lua_tostring(L, -1), "connection");
  }
  int ok = fl_pq_raw_encoding(c->pg) == 0;
  if (ok) {
    PGresult *r = PQexec(c->pg, canonical_settings);
    ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    PQclear(r);
  }
  if (!ok) {
    lua_pushfstring(L, "cannot set session settings: %s", PQerrorMessage(c->pg));
    PQfinish(c->pg);
    c->pg = NULL;
    return fl_fail(L, lua_tostring(L, -1), "connection");
  }
  return 1;
}

static int l_close(lua_State *L) {
  fl_conn *c = luaL_checkudata(L, 1, CONN_MT);
  if (c->pg) { PQfinish(c->pg); c->pg = NULL; }
  free_notices(c);
  return 0;
}

/* conn:notices() -> { "WARNING:  ...", ... } (and forgets them) */
static int l_notices(lua_State *L) {
  fl_conn *c = luaL_checkudata(L, 1, CONN_MT);
  lua_createtable(L, c->nnotices, 0);
  for (int i = 0; i < c->nnotices; i++) {
    size_t n = strlen(c->notices[i]);
    while (n > 0 && c->notices[i][n - 1] == '\n') n--;
    lua_pushlstring(L, c->notices[i], n);
    lua_rawseti(L, -2, i + 1);
  }
  free_notices(c);
  return 1;
}

/* Built-in types the decoder needs no catalog for: its own scalars and text forms. */
static int known_scalar(uint32_t oid) {
  switch (oid) {
    case 16: case 17: case 18: case 19: case 20: case 21: case 23: case 25: case 26: case 114:
    case 650: case 700: case 701: case 774: case 829: case 869: case 1042: case 1043: case 1082:
    case 1083: case 1114: case 1184: case 1186: case 1266: case 1700: case 2950: case 3802:
      return 1;
    default:
      return 0;
  }
}

static const char *const resolve_sql =
  "WITH RECURSIVE b(oid, typtype, base) AS ("
  "  SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = $1::pg_catalog.oid"
  "  UNION ALL SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t JOIN b ON t.oid = b.base"
  "  WHERE b.typtype = 'd'),"
  " bt AS (SELECT t.* FROM pg_catalog.pg_type t JOIN b ON t.oid = b.oid WHERE b.typtype <> 'd'),"
  " e(oid, typtype, base) AS ("
  "  SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t JOIN bt ON t.oid = bt.typelem"
  "  WHERE bt.typcategory = 'A'"
  "  UNION ALL SELECT t.oid, t.typtype, t.typbasetype FROM pg_catalog.pg_type t JOIN e ON t.oid = e.base"
  "  WHERE e.typtype = 'd')"
  " SELECT bt.oid, coalesce((SELECT oid FROM e WHERE typtype <> 'd'), 0),"
  "  coalesce((SELECT t.typdelim FROM pg_catalog.pg_type t WHERE t.oid = bt.typelem AND bt.typcategory = 'A'), ',')"
  " FROM bt";

/* The decoding of result column type `oid` on connection `c` (cached); falls back to the
 * built-in table when the catalog cannot be asked. */
static fl_coltype resolve_type(fl_conn *c, uint32_t oid) {
  fl_coltype t = { oid, fl_builtin_elem(oid), ',' };
  if (t.elem || known_scalar(oid) || !c || !c->pg) return t;
  for (int i = 0; i < c->ntypes; i++)
    if (c->type_oid[i] == oid) return c->types[i];
  char buf[16];
  snprintf(buf, sizeof buf, "%u", oid);
  const char *vals[1] = { buf };
  PGresult *r = PQexecParams(c->pg, resolve_sql, 1, NULL, vals, NULL, NULL, 0);
  if (r && PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
    t.oid = (uint32_t)strtoul(PQgetvalue(r, 0, 0), NULL, 10);
    t.elem = (uint32_t)strtoul(PQgetvalue(r, 0, 1), NULL, 10);
    t.delim = PQgetvalue(r, 0, 2)[0] ? PQgetvalue(r, 0, 2)[0] : ',';
    if (c->ntypes < TYPE_CACHE_MAX) {
      c->type_oid[c->ntypes] = oid;
      c->types[c->ntypes++] = t;
    }
  }
  PQclear(r);
  return t;
}

/* close_first: the connection is closed once the types are known, before any value is
 * copied into Lua, so its input buffer (as large as the largest row it received) is freed
 * before the row's strings are made. Each value is read once: a bytea is decoded over
 * its text in the result. */
static void push_result_rows(lua_State *L, fl_conn *c, PGresult *r, int flags, int close_first) {
  int nrows = PQntuples(r), ncols = PQnfields(r);
  fl_coltype *types = lua_newuserdata(L, sizeof(fl_coltype) * (ncols ? ncols : 1));
  for (int j = 0; j < ncols; j++) types[j] = resolve_type(c, PQftype(r, j));
  /* The column names, made Lua strings once (not once per row): at the stack's top. */
  lua_createtable(L, ncols, 0);
  for (int j = 0; j < ncols; j++) {
    lua_pushstring(L, PQfname(r, j));
    lua_rawseti(L, -2, j + 1);
  }
  int names = lua_gettop(L);
  if (close_first && c->pg) { PQfinish(c->pg); c->pg = NULL; }
  lua_createtable(L, nrows, 0);
  for (int i = 0; i < nrows; i++) {
    lua_createtable(L, 0, ncols);
    for (int j = 0; j < ncols; j++) {
      lua_rawgeti(L, names, j + 1);
      if (PQgetisnull(r, i, j))
        lua_pushlightuserdata(L, FL_NULL);
      else
        fl_push_value_owned(L, &types[j], PQgetvalue(r, i, j), PQgetlength(r, i, j), flags);
      lua_rawset(L, -3);
    }
    lua_rawseti(L, -2, i + 1);
  }
  lua_replace(L, names - 1);   /* the rows take the types' place */
  lua_pop(L, 1);               /* the names */
}

/* Converts Lua parameter values to text; NULL for nil/flash.null. */
static const char *param_text(lua_State *L, int idx, char *numbuf, size_t numsz) {
  switch (lua_type(L, idx)) {
    case LUA_TNIL: return NULL;
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == FL_NULL) return NULL;
      break;
    case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? "t" : "f";
    case LUA_TNUMBER: {
      double d = lua_tonumber(L, idx);
      if (isnan(d)) return "NaN";
      if (isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
      if (d == floor(d) && fabs(d) < 9.2e18) snprintf(numbuf, numsz, "%lld", (long long)d);
      else snprintf(numbuf, numsz, "%.17g", d);
      return numbuf;
    }
    case LUA_TSTRING: return lua_tostring(L, idx);
    default: break;
  }
  luaL_argerror(L, idx, lua_pushfstring(L, "query parameter of type %s cannot be sent (use a string, number, boolean, nil or flash.null)", luaL_typename(L, idx)));
  return NULL;
}

/* Pushes a query result (rows, ntuples) or its error (nil, err, kind); clears it. */
static int push_result(lua_State *L, fl_conn *c, PGresult *r, int flags, int close_first) {
  if (r == NULL) return conn_fail(L, c, PQerrorMessage(c->pg));
  ExecStatusType st = PQresultStatus(r);
  if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
    push_result_rows(L, c, r, flags, close_first);
    const char *ct = PQcmdTuples(r);
    lua_pushinteger(L, ct && *ct ? atoi(ct) : PQntuples(r));
    PQclear(r);
    return 2;
  }
  return fl_push_pgerror(L, c->pg, r);
}

/* conn:exec(sql, [flags], ...) -> rows, ntuples | nil, err, kind
 * With no parameters the text may hold several statements (the last result is returned). */
static int exec_sql(lua_State *L, int close_first) {
  fl_conn *c = check_conn(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  int flags = (int)luaL_optinteger(L, 3, 0);
  int nparams = lua_gettop(L) - 3;
  PGresult *r;
  if (nparams <= 0) {
    r = PQexec(c->pg, sql);
  } else {
    const char **vals = lua_newuserdata(L, sizeof(char *) * nparams);
    char (*nums)[32] = lua_newuserdata(L, 32 * nparams);
    for (int i = 0; i < nparams; i++) vals[i] = param_text(L, 4 + i, nums[i], sizeof nums[i]);
    r = PQexecParams(c->pg, sql, nparams, NULL, vals, NULL, NULL, 0);
  }
  return push_result(L, c, r, flags, close_first);
}

static int l_exec(lua_State *L) { return exec_sql(L, 0); }

/* conn:exec_last(sql, [flags], ...) -> as conn:exec, and the connection is closed once the
 * result has arrived, before its values are copied: for a connection opened to read one
 * large row, whose memory then returns after the row, not after its copy. */
static int l_exec_last(lua_State *L) { return exec_sql(L, 1); }

/* conn:prepare(name, sql) -> true | nil, err, kind : a named statement of this
 * session, for statements run often (one parse and plan, not one per run). */
static int l_prepare(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  const char *name = luaL_checkstring(L, 2);
  const char *sql = luaL_checkstring(L, 3);
  PGresult *r = PQprepare(c->pg, name, sql, 0, NULL);
  if (r == NULL) return conn_fail(L, c, PQerrorMessage(c->pg));
  if (PQresultStatus(r) == PGRES_COMMAND_OK) {
    PQclear(r);
    lua_pushboolean(L, 1);
    return 1;
  }
  return fl_push_pgerror(L, c->pg, r);
}

/* conn:exec_prepared(name, [flags], ...) -> as conn:exec */
static int l_exec_prepared(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  const char *name = luaL_checkstring(L, 2);
  int flags = (int)luaL_optinteger(L, 3, 0);
  int nparams = lua_gettop(L) - 3;
  if (nparams < 0) nparams = 0;
  const char **vals = lua_newuserdata(L, sizeof(char *) * (nparams ? nparams : 1));
  char (*nums)[32] = lua_newuserdata(L, 32 * (nparams ? nparams : 1));
  for (int i = 0; i < nparams; i++) vals[i] = param_text(L, 4 + i, nums[i], sizeof nums[i]);
  return push_result(L, c, PQexecPrepared(c->pg, name, nparams, vals, NULL, NULL, 0), flags, 0);
}

int fl_push_pgerror(lua_State *L, PGconn *pg, PGresult *res) {
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  const char *msg = res ? PQresultErrorMessage(res) : NULL;
  if (!msg || !*msg) msg = PQerrorMessage(pg);
  if (strncmp(msg, "ERROR:  ", 8) == 0) msg += 8;
  lua_pushstring(L, msg);   /* msg may be libpq's error buffer, which the read may grow */
  msg = lua_tostring(L, -1);
  int n = fl_fail(L, msg, state && *state ? state : still_connected(pg) ? "protocol" : "connection");
  PQclear(res);
  return n;
}

static int l_escape_identifier(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  char *e = PQescapeIdentifier(c->pg, s, len);
  if (!e) return conn_fail(L, c, PQerrorMessage(c->pg));
  lua_pushstring(L, e);
  PQfreemem(e);
  return 1;
}

static int l_escape_literal(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  char *e = PQescapeLiteral(c->pg, s, len);
  if (!e) return conn_fail(L, c, PQerrorMessage(c->pg));
  lua_pushstring(L, e);
  PQfreemem(e);
  return 1;
}

static int l_fd(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  lua_pushinteger(L, PQsocket(c->pg));
  return 1;
}

static int l_backend_pid(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  lua_pushinteger(L, PQbackendPID(c->pg));
  return 1;
}

static int l_ok(lua_State *L) {
  fl_conn *c = luaL_checkudata(L, 1, CONN_MT);
  lua_pushboolean(L, c->pg && PQstatus(c->pg) == CONNECTION_OK);
  return 1;
}

/* conn:consume() -> true | nil, err, kind  (reads what the socket has, never blocks) */
static int l_consume(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  if (!PQconsumeInput(c->pg) || PQstatus(c->pg) != CONNECTION_OK)
    return conn_fail(L, c, PQerrorMessage(c->pg));
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:notify() -> channel, payload, pid | nil  (one queued notification) */
static int l_notify(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  PGnotify *n = PQnotifies(c->pg);
  if (!n) return 0;
  lua_pushstring(L, n->relname);
  lua_pushstring(L, n->extra);
  lua_pushinteger(L, n->be_pid);
  PQfreemem(n);
  return 3;
}

/* core.layout({ {name=, oid=, elem=, delim=, [pos=]}, ... }, [flags]) -> layout
 * pos: the column's 1-based position in a batch row (default: its index). */
static int l_layout(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int n = (int)lua_objlen(L, 1);
  fl_layout *lo = lua_newuserdata(L, sizeof *lo);
  memset(lo, 0, sizeof *lo);
  luaL_getmetatable(L, LAYOUT_MT);
  lua_setmetatable(L, -2);
  lo->flags = (int)luaL_optinteger(L, 2, 0);
  lo->names = calloc(n ? n : 1, sizeof(char *));
  lo->namelen = calloc(n ? n : 1, sizeof(size_t));
  lo->types = calloc(n ? n : 1, sizeof(fl_coltype));
  lo->pos = calloc(n ? n : 1, sizeof(int));
  if (!lo->names || !lo->namelen || !lo->types || !lo->pos) return luaL_error(L, "out of memory");
  lo->n = n;
  for (int i = 0; i < n; i++) {
    lua_rawgeti(L, 1, i + 1);
    luaL_checktype(L, -1, LUA_TTABLE);
    lua_getfield(L, -1, "name");
    size_t len;
    const char *name = luaL_checklstring(L, -1, &len);
    lo->names[i] = malloc(len + 1);
    if (!lo->names[i]) return luaL_error(L, "out of memory");
    memcpy(lo->names[i], name, len + 1);
    lo->namelen[i] = len;
    lua_getfield(L, -2, "oid");
    lo->types[i].oid = (uint32_t)luaL_checknumber(L, -1);
    lua_getfield(L, -3, "elem");
    lo->types[i].elem = (uint32_t)luaL_optnumber(L, -1, 0);
    lua_getfield(L, -4, "delim");
    const char *d = luaL_optstring(L, -1, ",");
    lo->types[i].delim = d[0] ? d[0] : ',';
    lua_getfield(L, -5, "pos");
    lo->pos[i] = (int)luaL_optinteger(L, -1, i + 1) - 1;
    if (lo->pos[i] < 0) return luaL_error(L, "column #%d: pos must be 1 or more", i + 1);
    lua_pop(L, 6);
  }
  return 1;
}

static int l_layout_gc(lua_State *L) {
  fl_layout *lo = luaL_checkudata(L, 1, LAYOUT_MT);
  if (lo->names) for (int i = 0; i < lo->n; i++) free(lo->names[i]);
  free(lo->names); free(lo->namelen); free(lo->types); free(lo->pos);
  lo->names = NULL; lo->namelen = NULL; lo->types = NULL; lo->pos = NULL; lo->n = 0;
  return 0;
}

/* layout:record(text) -> row, nfields | nil, err, kind
 * A row in composite text form (record_out, as the trigger drivers capture it) decoded by
 * the layout: field i is column i. nfields is how many fields the text had: fewer or more
 * than the layout's columns means the table's shape changed between the write and now
 * (the columns that both have are decoded; the caller decides what to say). */
static int l_layout_record(lua_State *L) {
  const fl_layout *lo = luaL_checkudata(L, 1, LAYOUT_MT);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  char small[1024];
  /* The scratch buffer is a userdata past the stack buffer's size, so that a Lua error
   * while the row is built cannot leak it. */
  char *buf = len <= sizeof small ? small : lua_newuserdata(L, len);
  fl_rec_reader r;
  fl_rec_init(&r, s, len, buf);
  lua_createtable(L, 0, lo->n);
  int i = 0;
  for (;;) {
    const char *v; size_t vlen;
    fl_rec_tok t = fl_rec_next(&r, &v, &vlen);
    if (t == FL_REC_END) break;
    if (t == FL_REC_ERROR) return fl_failf(L, "protocol", "malformed row text: %s", r.err);
    if (i < lo->n) {
      lua_pushlstring(L, lo->names[i], lo->namelen[i]);
      if (t == FL_REC_NULL) lua_pushlightuserdata(L, FL_NULL);
      /* v lies in buf, ours, and each field is read once: a bytea decodes in place. */
      else fl_push_value_owned(L, &lo->types[i], (char *)v, vlen, lo->flags);
      lua_rawset(L, -3);
    }
    i++;
  }
  /* "()" is one NULL field: a row of no columns prints the same way. */
  if (lo->n == 0 && i == 1) i = 0;
  lua_pushinteger(L, i);
  return 2;
}

/* conn:copy(sql, layout, [opts]) -> rows, info | nil, err, kind
 * Runs sql (one simple query string: statements, of which one is a COPY ... TO STDOUT in
 * text format) in one round trip and decodes the COPY's lines by the layout, in C, as
 * they arrive: no result set of strings in between, no column names per cell. opts.src:
 * each line starts with a relation oid that is not a column (info.src[i], a number);
 * opts.src_list = false (with opts.lines): no info.src (the FFI reader of lines reads each
 * line's oid); opts.keys: layout positions whose text in the last line is returned (info.last: the
 * text, exact whatever the type, before any in-place bytea decoding); opts.sent: sql was
 * already sent with conn:send (the server has been producing the rows meanwhile: sql is
 * then not used). info.values: the
 * first value (text, or false) of each statement that returned rows, in order. An error
 * in any statement returns nil, err, kind once the connection is idle again (the
 * caller ends its transaction). */
#define COPY_ERR_MAX 1024

typedef struct {
  char msg[COPY_ERR_MAX];
  char kind[16];       /* the SQLSTATE, or "connection" / "protocol" */
  int set;
} copy_err;

static void copy_fail(copy_err *e, const char *msg, const char *state) {
  if (e->set) return;
  e->set = 1;
  if (strncmp(msg, "ERROR:  ", 8) == 0) msg += 8;
  snprintf(e->msg, sizeof e->msg, "%s", msg);
  snprintf(e->kind, sizeof e->kind, "%s", state && *state ? state : state ? "protocol" : "connection");
}

/* A userdata buffer at stack slot `slot`, grown (replaced, its first `keep` bytes kept)
 * to hold `need` bytes. */
static char *copy_room(lua_State *L, int slot, size_t *cap, size_t need, size_t keep) {
  if (need <= *cap) return lua_touserdata(L, slot);
  size_t n = *cap ? *cap : 256;
  while (n < need) n *= 2;
  char *p = lua_newuserdata(L, n);
  if (keep) memcpy(p, lua_touserdata(L, slot), keep);
  lua_replace(L, slot);
  *cap = n;
  return p;
}

/* Where one COPY line's key texts go (the cursor of the next chunk): the line's fields at
 * layout positions pos[0..n-1], copied into the growable buffer at stack slot `slot`. */
typedef struct {
  int n, pos[32], slot;
  size_t cap, off[32], len[32];
  int null[32];
} copy_keys;

/* Decodes one COPY line (buf, len: decoded in place) by the layout into a row table
 * pushed on the stack. names: the stack slot of the layout's column names (0: pushed
 * from the layout). with_src: the line starts with a relation oid, stored in *src (if not
 * NULL). keys
 * (or NULL): their texts are kept. Returns NULL, or what is wrong (nothing pushed). */
/* An oid's decimal text (digits only, as the server prints it) as a number. */
static double oid_text(const char *s, size_t len) {
  double v = 0;
  for (size_t i = 0; i < len && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (s[i] - '0');
  return v;
}

static const char *copy_line_row(lua_State *L, const fl_layout *lo, char *buf, size_t len, int names,
                                 int with_src, double *src, copy_keys *keys) {
  fl_copy_reader rd;
  fl_copy_init(&rd, buf, len, buf);
  const char *v;
  size_t vlen;
  fl_rec_tok t;
  if (with_src) {
    t = fl_copy_next(&rd, &v, &vlen);
    if (t != FL_REC_FIELD) return "COPY line without its relation";
    if (src) *src = oid_text(v, vlen);
  }
  lua_createtable(L, 0, lo->n);
  int f = 0;
  size_t kused = 0;
  for (;; f++) {
    t = fl_copy_next(&rd, &v, &vlen);
    if (t == FL_REC_END || t == FL_REC_ERROR) break;
    if (f >= lo->n) continue;
    for (int k = 0; keys && k < keys->n; k++) {
      if (keys->pos[k] != f) continue;
      keys->null[k] = t == FL_REC_NULL;
      keys->len[k] = keys->null[k] ? 0 : vlen;
      keys->off[k] = kused;
      if (!keys->null[k]) {
        char *kb = copy_room(L, keys->slot, &keys->cap, kused + vlen + 1, kused);
        memcpy(kb + kused, v, vlen);
        kused += vlen;
      }
    }
    if (names) lua_pushvalue(L, names + f);
    else lua_pushlstring(L, lo->names[f], lo->namelen[f]);
    if (t == FL_REC_NULL) lua_pushlightuserdata(L, FL_NULL);
    else fl_push_value_owned(L, &lo->types[f], (char *)v, vlen, lo->flags);
    lua_rawset(L, -3);
  }
  if (t == FL_REC_ERROR || f != lo->n) {
    lua_pop(L, 1);
    return t == FL_REC_ERROR ? "malformed COPY line" : "COPY line does not have the layout's columns (the table changed?)";
  }
  return NULL;
}

/* A chunk's COPY lines as they came ("flash.lines", conn:copy with opts.lines), each
 * decoded into a row only when asked: lines:row(i, layout). Rows built one at a time,
 * each handed on before the next, keep the Lua heap small and warm (a whole chunk of
 * row tables built first costs about twice the CPU in allocation and collection). */
#define LINES_MT "flash.lines"

typedef struct {
  char *buf;
  size_t len, cap;
  size_t *off;        /* line i (0-based) is buf[off[i], off[i + 1]) */
  int n, ncap;
  int with_src;       /* each line starts with a relation oid (conn:copy's opts.src) */
  char *scratch;      /* fl_lines_decode's copy of the line it decodes */
  size_t scap;
} fl_lines;

static int lines_add(fl_lines *ls, const char *line, size_t len) {
  if (ls->n + 2 > ls->ncap) {
    int nc = ls->ncap ? ls->ncap * 2 : 1024;
    size_t *o = realloc(ls->off, (size_t)nc * sizeof *o);
    if (!o) return -1;
    ls->off = o;
    ls->ncap = nc;
  }
  if (ls->len + len > ls->cap) {
    size_t nc = ls->cap ? ls->cap : 65536;
    while (nc < ls->len + len) nc *= 2;
    char *b = realloc(ls->buf, nc);
    if (!b) return -1;
    ls->buf = b;
    ls->cap = nc;
  }
  memcpy(ls->buf + ls->len, line, len);
  ls->off[ls->n] = ls->len;
  ls->len += len;
  ls->n++;
  ls->off[ls->n] = ls->len;
  return 0;
}

static int l_lines_gc(lua_State *L) {
  fl_lines *ls = luaL_checkudata(L, 1, LINES_MT);
  free(ls->buf);
  free(ls->off);
  free(ls->scratch);
  ls->buf = NULL;
  ls->off = NULL;
  ls->scratch = NULL;
  ls->n = ls->ncap = 0;
  ls->len = ls->cap = ls->scap = 0;
  return 0;
}

/* lines:row(i, layout) -> the row of line i | nil, err. A line is decoded in a copy: the
 * same line can be asked for again. */
static int l_lines_row(lua_State *L) {
  fl_lines *ls = luaL_checkudata(L, 1, LINES_MT);
  int i = (int)luaL_checkinteger(L, 2) - 1;
  const fl_layout *lo = luaL_checkudata(L, 3, LAYOUT_MT);
  if (i < 0 || i >= ls->n) return luaL_argerror(L, 2, "no such line");
  luaL_checkstack(L, 8, "decoding a COPY row");
  size_t len = ls->off[i + 1] - ls->off[i];
  char stack[512];
  char *buf = len <= sizeof stack ? stack : lua_newuserdata(L, len);
  memcpy(buf, ls->buf + ls->off[i], len);
  /* The relation oid is skipped: conn:copy put them in info.src. */
  const char *err = copy_line_row(L, lo, buf, len, 0, 1, NULL, NULL);
  if (err) return fl_fail(L, err, "parse");
  return 1;
}

static int l_lines_len(lua_State *L) {
  fl_lines *ls = luaL_checkudata(L, 1, LINES_MT);
  lua_pushinteger(L, ls->n);
  return 1;
}

/* The reader of lines through LuaJIT's FFI (lua/flash/backfill.lua): a line's values
 * decoded by the layout into plain C (numbers, booleans, NULL, the text of strings), so
 * that compiled Lua builds the row table with the layout's names as constants -- no Lua C
 * API call per field, no interning of the column names per row. fl_value_scalar gives
 * each value the Lua value fl_push_value would push. */
typedef struct {
  double num;         /* FL_VAL_NUMBER */
  const char *s;      /* FL_VAL_STRING: the text, valid until the next call */
  int32_t len;
  int32_t kind;       /* FL_VAL_* */
} fl_copy_val;

/* Line i (1-based) of ls into out[0 .. lo->n - 1], and its relation oid (lines that start
 * with one) into out[lo->n].num: lo->n, or -1 for a malformed line or one not of the
 * layout's columns, -2 out of memory, -3 a value fl_value_scalar leaves to fl_push_value
 * (the caller decodes that line with lines:row; the oid is set). */
static int lines_decode(void *lsp, int i, const void *lop, fl_copy_val *out) {
  fl_lines *ls = lsp;
  const fl_layout *lo = lop;
  if (i < 1 || i > ls->n) return -1;
  size_t len = ls->off[i] - ls->off[i - 1];
  const char *line = ls->buf + ls->off[i - 1];
  fl_copy_reader rd;
  fl_copy_init(&rd, line, len, NULL);   /* a line without a backslash is read where it is */
  if (!rd.plain) {
    /* Unescaped in a copy: the line may be read again. */
    if (len + 1 > ls->scap) {
      size_t n = ls->scap ? ls->scap : 1024;
      while (n < len + 1) n *= 2;
      char *p = realloc(ls->scratch, n);
      if (!p) return -2;
      ls->scratch = p;
      ls->scap = n;
    }
    memcpy(ls->scratch, line, len);
    fl_copy_init(&rd, ls->scratch, len, ls->scratch);
  }
  const char *v;
  size_t vlen;
  fl_rec_tok t;
  if (ls->with_src) {
    if (fl_copy_next(&rd, &v, &vlen) != FL_REC_FIELD) return -1;
    out[lo->n].num = oid_text(v, vlen);
  }
  int f = 0;
  for (;; f++) {
    t = fl_copy_next(&rd, &v, &vlen);
    if (t == FL_REC_END || t == FL_REC_ERROR) break;
    if (f >= lo->n) continue;
    int kind = fl_value_scalar(&lo->types[f], t == FL_REC_NULL ? NULL : v, vlen, lo->flags, &out[f].num);
    if (kind == FL_VAL_OTHER) return -3;
    out[f].kind = kind;
    out[f].s = v;
    out[f].len = (int32_t)vlen;
  }
  if (t == FL_REC_ERROR || f != lo->n) return -1;
  return f;
}

/* What the FFI reader calls: a struct of function pointers (its layout is declared again
 * in lua/flash/backfill.lua). */
static const struct {
  int (*decode)(void *lines, int i, const void *layout, fl_copy_val *out);
} lines_api = { lines_decode };

/* core.lines_api() -> light userdata: the functions of the FFI reader of lines. */
static int l_lines_api(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&lines_api);
  return 1;
}

static const luaL_Reg lines_methods[] = {
  { "row", l_lines_row },
  { "count", l_lines_len },
  { NULL, NULL }
};

static int l_copy(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  const fl_layout *lo = luaL_checkudata(L, 3, LAYOUT_MT);
  int with_src = 0, sent = 0, as_lines = 0, src_list = 1;
  copy_keys keys = { .n = 0 };
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    lua_getfield(L, 4, "sent");
    sent = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 4, "lines");
    as_lines = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 4, "src");
    with_src = lua_toboolean(L, -1);
    lua_getfield(L, 4, "src_list");
    src_list = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 4, "keys");
    if (lua_istable(L, -1)) {
      keys.n = (int)lua_objlen(L, -1);
      if (keys.n > 32) return luaL_argerror(L, 4, "at most 32 keys");
      for (int i = 0; i < keys.n; i++) {
        lua_rawgeti(L, -1, i + 1);
        keys.pos[i] = (int)luaL_checkinteger(L, -1) - 1;
        if (keys.pos[i] < 0 || keys.pos[i] >= lo->n) return luaL_argerror(L, 4, "key position outside the layout");
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 2);
  }
  lua_settop(L, 3);
  luaL_checkstack(L, lo->n + 16, "decoding COPY rows");
  int names = lua_gettop(L) + 1;
  for (int i = 0; i < lo->n; i++) lua_pushlstring(L, lo->names[i], lo->namelen[i]);
  fl_lines *ls = NULL;
  if (as_lines) {                                   /* rows: the lines, decoded later */
    ls = lua_newuserdata(L, sizeof *ls);
    memset(ls, 0, sizeof *ls);
    luaL_getmetatable(L, LINES_MT);
    lua_setmetatable(L, -2);
    ls->with_src = with_src;
  } else {
    lua_newtable(L);                                /* rows */
  }
  int rows = lua_gettop(L);
  lua_newtable(L);                                  /* info */
  int info = rows + 1;
  lua_newtable(L);                                  /* info.values */
  int values = rows + 2;
  if (with_src) lua_newtable(L); else lua_pushnil(L);
  int src = rows + 3;
  lua_pushnil(L);                                   /* the line scratch */
  int scratch = rows + 4;
  lua_pushnil(L);                                   /* the last line's key texts */
  keys.slot = rows + 5;
  size_t scap = 0;
  int nvalues = 0, nrows = 0;
  copy_err err = { .set = 0 };
  if (!sent && !PQsendQuery(c->pg, sql)) return conn_fail(L, c, PQerrorMessage(c->pg));
  PGresult *r;
  while ((r = PQgetResult(c->pg)) != NULL) {
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK) {
      int has = PQntuples(r) > 0 && PQnfields(r) > 0 && !PQgetisnull(r, 0, 0);
      if (has) lua_pushlstring(L, PQgetvalue(r, 0, 0), (size_t)PQgetlength(r, 0, 0));
      else lua_pushboolean(L, 0);
      lua_rawseti(L, values, ++nvalues);
    } else if (st == PGRES_COPY_OUT) {
      PQclear(r);
      r = NULL;
      for (;;) {
        char *line = NULL;
        int len = PQgetCopyData(c->pg, &line, 0);
        if (len < 0) {
          if (len == -2) copy_fail(&err, PQerrorMessage(c->pg), NULL);
          break;
        }
        if (err.set) { PQfreemem(line); continue; }
        if (ls) {
          /* Kept as it came; its relation oid read now (digits: no escapes). */
          int bad = lines_add(ls, line, (size_t)len);
          PQfreemem(line);
          if (bad) { copy_fail(&err, "out of memory", ""); continue; }
          if (with_src && src_list) {
            lua_pushnumber(L, oid_text(ls->buf + ls->off[nrows], (size_t)len));
            lua_rawseti(L, src, nrows + 1);
          }
          nrows++;
          continue;
        }
        /* Ours (a Lua error while the row is built frees it), decoded in place. */
        char *buf = copy_room(L, scratch, &scap, (size_t)len + 1, 0);
        memcpy(buf, line, (size_t)len);
        PQfreemem(line);
        double oid = 0;
        const char *bad = copy_line_row(L, lo, buf, (size_t)len, names, with_src, &oid, keys.n ? &keys : NULL);
        if (bad) { copy_fail(&err, bad, ""); continue; }
        if (with_src) {
          lua_pushnumber(L, oid);
          lua_rawseti(L, src, nrows + 1);
        }
        lua_rawseti(L, rows, ++nrows);
      }
    } else if (st != PGRES_COMMAND_OK) {
      copy_fail(&err, PQresultErrorMessage(r), PQresultErrorField(r, PG_DIAG_SQLSTATE));
    }
    if (r) PQclear(r);
  }
  if (!err.set && ls && keys.n && nrows) {
    /* The last line's key texts: from a decoding of it alone. */
    size_t len = ls->off[nrows] - ls->off[nrows - 1];
    char *buf = copy_room(L, scratch, &scap, len + 1, 0);
    memcpy(buf, ls->buf + ls->off[nrows - 1], len);
    double oid;
    const char *bad = copy_line_row(L, lo, buf, len, names, with_src, &oid, &keys);
    if (bad) copy_fail(&err, bad, ""); else lua_pop(L, 1);
  }
  if (err.set) return fl_fail(L, err.msg, err.kind);
  lua_pushvalue(L, values);
  lua_setfield(L, info, "values");
  lua_pushinteger(L, nrows);
  lua_setfield(L, info, "n");
  if (with_src && src_list) { lua_pushvalue(L, src); lua_setfield(L, info, "src"); }
  if (keys.n && nrows) {
    const char *kb = lua_touserdata(L, keys.slot);
    lua_createtable(L, keys.n, 0);
    for (int k = 0; k < keys.n; k++) {
      if (keys.null[k]) lua_pushlightuserdata(L, FL_NULL);
      else lua_pushlstring(L, kb ? kb + keys.off[k] : "", keys.len[k]);
      lua_rawseti(L, -2, k + 1);
    }
    lua_setfield(L, info, "last");
  }
  lua_pushvalue(L, rows);
  lua_pushvalue(L, info);
  return 2;
}

/* conn:send(sql) -> true | nil, err, kind : sends a query without waiting for its results;
 * conn:copy(sql, layout, { sent = true }) reads them. */
static int l_send(lua_State *L) {
  fl_conn *c = check_conn(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  if (!PQsendQuery(c->pg, sql)) return conn_fail(L, c, PQerrorMessage(c->pg));
  lua_pushboolean(L, 1);
  return 1;
}

static const luaL_Reg layout_methods[] = {
  { "record", l_layout_record },
  { NULL, NULL }
};

static const luaL_Reg conn_methods[] = {
  { "exec", l_exec },
  { "exec_last", l_exec_last },
  { "prepare", l_prepare },
  { "exec_prepared", l_exec_prepared },
  { "copy", l_copy },
  { "send", l_send },
  { "escape_identifier", l_escape_identifier },
  { "escape_literal", l_escape_literal },
  { "fd", l_fd },
  { "backend_pid", l_backend_pid },
  { "ok", l_ok },
  { "consume", l_consume },
  { "notify", l_notify },
  { "close", l_close },
  { "notices", l_notices },
  { NULL, NULL }
};

const luaL_Reg fl_conn_funcs[] = {
  { "connect", l_connect },
  { "layout", l_layout },
  { "lines_api", l_lines_api },
  { NULL, NULL }
};

/* A userdata metatable: __gc, and methods (if any) as __index. */
void fl_new_metatable(lua_State *L, const char *name, lua_CFunction gc, const luaL_Reg *methods) {
  luaL_newmetatable(L, name);
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  if (methods) {
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

void fl_conn_open(lua_State *L) {
  fl_new_metatable(L, CONN_MT, l_close, conn_methods);
  fl_new_metatable(L, LAYOUT_MT, l_layout_gc, layout_methods);
  fl_new_metatable(L, LINES_MT, l_lines_gc, lines_methods);
}
