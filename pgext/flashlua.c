/* flashlua: the PostgreSQL side of the pg_extension driver. The SQL functions that write
 * the listener registry (flash.listen / flash.unlisten) and the logical-decoding output
 * plugin "flashlua", which reads that registry under each change's historic snapshot and
 * sends only what some listener of its consumer wants (frame format: pgext/README.md). */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/sysattr.h"
#include "access/table.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/catalog.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_class.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "fmgr.h"
#include "libpq/pqformat.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/bitmapset.h"
#include "replication/logical.h"
#include "replication/output_plugin.h"
#include "replication/walsender.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"
/* Last: libpq.h (the walsender's output buffer, held_write) includes libpq-be.h, which
 * includes the GSSAPI headers when the server was built with GSSAPI, and they are not a
 * dependency of postgresql-server-dev-15. Nothing of GSSAPI is used here, and Port's
 * layout does not depend on it (its gss member is a pointer either way). */
#undef ENABLE_GSS
#include "libpq/libpq.h"

PG_MODULE_MAGIC;

#define FLASH_VERSION "0.1"
#define FLASH_SCHEMA "flash"
#define FLASH_REGISTRY "listeners"
#define FLASH_SEQUENCE "listeners_id_seq"
#define FLASH_TAG_PREFIX "flashlua"

/* Operation bits (the registry's ops). */
#define OP_INSERT 1
#define OP_UPDATE 2
#define OP_DELETE 4
#define OP_TRUNCATE 8

/* Condition operators (the registry's cond_op). */
enum { C_EQ = 1, C_NE, C_LT, C_LE, C_GT, C_GE, C_ISNULL, C_NOTNULL, C_IN };
static const char *const cond_names[] = { "", "=", "<>", "<", "<=", ">", ">=", "is null", "is not null", "in" };

/* The registry's columns, in the order of flashlua--0.1.sql. */
enum {
  R_ID, R_CONSUMER, R_RELID, R_OPS, R_COLS, R_PK, R_COND_ATT, R_COND_OP, R_COND_N, R_COND_TYP,
  R_COND_VAL, R_OWNER, R_NOTE, R_CREATED, R_NATTS
};

void _PG_output_plugin_init(OutputPluginCallbacks *cb);
PG_FUNCTION_INFO_V1(flash_version);
PG_FUNCTION_INFO_V1(flash_listen);
PG_FUNCTION_INFO_V1(flash_unlisten);

static Oid registry_relid(bool missing_ok) {
  Oid nsp = get_namespace_oid(FLASH_SCHEMA, missing_ok);
  Oid rel = OidIsValid(nsp) ? get_relname_relid(FLASH_REGISTRY, nsp) : InvalidOid;
  if (!OidIsValid(rel) && !missing_ok)
    ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
                    errmsg("the flashlua registry %s.%s is missing", FLASH_SCHEMA, FLASH_REGISTRY),
                    errhint("DROP EXTENSION flashlua; CREATE EXTENSION flashlua;")));
  return rel;
}

Datum flash_version(PG_FUNCTION_ARGS) {
  PG_RETURN_TEXT_P(cstring_to_text(FLASH_VERSION));
}

/* ------------------------------------------------------------------------------------ */
/* flash.listen / flash.unlisten */

static void text_array(ArrayType *a, Datum **elems, bool **nulls, int *n) {
  deconstruct_array(a, TEXTOID, -1, false, TYPALIGN_INT, elems, nulls, n);
}

/* The attnum of column `name` in rel (live columns only), or an ERROR naming `what`. */
static AttrNumber column_attnum(Relation rel, const char *name, const char *what) {
  TupleDesc desc = RelationGetDescr(rel);
  for (int i = 0; i < desc->natts; i++) {
    Form_pg_attribute a = TupleDescAttr(desc, i);
    if (!a->attisdropped && strcmp(NameStr(a->attname), name) == 0) return a->attnum;
  }
  ereport(ERROR, (errcode(ERRCODE_UNDEFINED_COLUMN),
                  errmsg("flash.listen: column \"%s\" in %s does not exist in table %s", name, what,
                         RelationGetRelationName(rel))));
  return InvalidAttrNumber;
}

/* Attnums of a text[] of column names (NULL array: NULL). */
static int16 *column_list(Relation rel, ArrayType *a, const char *what, int *count) {
  Datum *elems;
  bool *nulls;
  int n;
  int16 *out;
  text_array(a, &elems, &nulls, &n);
  if (n == 0)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("flash.listen: %s is an empty list (pass NULL for every column)", what)));
  out = palloc(sizeof(int16) * n);
  for (int i = 0; i < n; i++) {
    if (nulls[i])
      ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("flash.listen: %s contains NULL", what)));
    out[i] = column_attnum(rel, TextDatumGetCString(elems[i]), what);
  }
  *count = n;
  return out;
}

static Datum int2_array(const int16 *v, int n) {
  Datum *d = palloc(sizeof(Datum) * (n ? n : 1));
  for (int i = 0; i < n; i++) d[i] = Int16GetDatum(v[i]);
  return PointerGetDatum(construct_array(d, n, INT2OID, 2, true, TYPALIGN_SHORT));
}

static int op_code(const char *s) {
  for (int i = 1; i <= C_IN; i++)
    if (pg_strcasecmp(s, cond_names[i]) == 0) return i;
  if (strcmp(s, "==") == 0) return C_EQ;
  if (strcmp(s, "!=") == 0) return C_NE;
  return 0;
}

/* Whether values of base type `base` may be compared in the walsender: a btree comparison
 * and a receive function, both built in (nothing another role defined runs there). */
static void check_condition_type(Relation rel, Form_pg_attribute att, Oid base) {
  TypeCacheEntry *tc;
  Oid recv, ioparam;
  const char *col = NameStr(att->attname);
  if (OidIsValid(get_element_type(base)))
    ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                    errmsg("flash.listen: condition on column \"%s\": array columns cannot have conditions", col),
                    errhint("use a where function that decides in the client")));
  /* A composite's or range's value is read by its members' input functions, a domain's
   * among them, whose CHECK (the domain owner's expression) would run with the caller's
   * rights: only base types and enums (whose input functions are the server's). */
  if (get_typtype(base) != TYPTYPE_BASE && get_typtype(base) != TYPTYPE_ENUM)
    ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                    errmsg("flash.listen: condition on column \"%s\": values of type %s (a composite or range type) "
                           "cannot have conditions", col, format_type_be(base)),
                    errhint("use a where function that decides in the client")));
  tc = lookup_type_cache(base, TYPECACHE_CMP_PROC);
  if (!OidIsValid(tc->cmp_proc))
    ereport(ERROR, (errcode(ERRCODE_UNDEFINED_FUNCTION),
                    errmsg("flash.listen: condition on column \"%s\": type %s has no btree comparison", col,
                           format_type_be(base)),
                    errhint("use a where function that decides in the client")));
  getTypeBinaryInputInfo(base, &recv, &ioparam);
  if (tc->cmp_proc >= FirstNormalObjectId || recv >= FirstNormalObjectId)
    ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                    errmsg("flash.listen: condition on column \"%s\": type %s compares with a user-defined function, "
                           "which the walsender does not run", col, format_type_be(base)),
                    errhint("use a where function that decides in the client")));
}

/* The caller may listen to these columns: SELECT on the table, or on each of them. */
static void check_select(Relation rel, Oid role, Bitmapset *atts, bool all) {
  Oid relid = RelationGetRelid(rel);
  int a = -1;
  if (pg_class_aclcheck(relid, role, ACL_SELECT) == ACLCHECK_OK) return;
  if (all && pg_attribute_aclcheck_all(relid, role, ACL_SELECT, ACLMASK_ALL) != ACLCHECK_OK)
    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("flash.listen: permission denied for table %s", RelationGetRelationName(rel)),
                    errhint("listening needs SELECT on the table, or on every column it delivers")));
  while ((a = bms_next_member(atts, a)) >= 0) {
    if (pg_attribute_aclcheck(relid, (AttrNumber)a, role, ACL_SELECT) != ACLCHECK_OK)
      ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                      errmsg("flash.listen: permission denied for column \"%s\" of table %s",
                             get_attname(relid, (AttrNumber)a, false), RelationGetRelationName(rel)),
                      errhint("listening needs SELECT on the table, or on every column it names")));
  }
}

/* flash._listen(tab, ops, columns, cond_col, cond_op, cond_n, cond_val, primary_key, consumer, note) */
Datum flash_listen(PG_FUNCTION_ARGS) {
  Oid relid, role = GetUserId(), regid, seqid;
  Relation rel, reg;
  int ops = 0, ncols = 0, npk = 0, ncond = 0, nval = 0, vi = 0;
  int16 *cols = NULL, *pk = NULL, *catt = NULL, *cop = NULL, *cn = NULL;
  Datum *ctyp = NULL, *cval = NULL;
  Bitmapset *named = NULL;
  char *consumer;
  Datum values[R_NATTS];
  bool nulls[R_NATTS];
  HeapTuple tup;
  int64 id;

  if (PG_ARGISNULL(0))
    ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("flash.listen: the table is NULL")));
  if (PG_ARGISNULL(8) || VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(8)) == 0)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("flash.listen: consumer must be a non-empty name")));
  relid = PG_GETARG_OID(0);
  consumer = text_to_cstring(PG_GETARG_TEXT_PP(8));
  rel = relation_open(relid, AccessShareLock);
  if (rel->rd_rel->relkind != RELKIND_RELATION && rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
    ereport(ERROR, (errcode(ERRCODE_WRONG_OBJECT_TYPE),
                    errmsg("flash.listen: %s is not a table", RelationGetRelationName(rel))));
  if (rel->rd_rel->relpersistence != RELPERSISTENCE_PERMANENT || IsCatalogRelation(rel) ||
      RelationIsUsedAsCatalogTable(rel))
    ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                    errmsg("flash.listen: changes of %s are not decoded from the WAL "
                           "(temporary, unlogged and catalog tables are not)", RelationGetRelationName(rel))));

  if (PG_ARGISNULL(1)) {
    ops = OP_INSERT | OP_UPDATE | OP_DELETE | OP_TRUNCATE;
  } else {
    Datum *e;
    bool *n;
    int k;
    text_array(PG_GETARG_ARRAYTYPE_P(1), &e, &n, &k);
    for (int i = 0; i < k; i++) {
      const char *s = n[i] ? "NULL" : TextDatumGetCString(e[i]);
      if (!n[i] && pg_strcasecmp(s, "insert") == 0) ops |= OP_INSERT;
      else if (!n[i] && pg_strcasecmp(s, "update") == 0) ops |= OP_UPDATE;
      else if (!n[i] && pg_strcasecmp(s, "delete") == 0) ops |= OP_DELETE;
      else if (!n[i] && pg_strcasecmp(s, "truncate") == 0) ops |= OP_TRUNCATE;
      else
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                        errmsg("flash.listen: unknown operation '%s' (expected insert, update, delete or truncate)", s)));
    }
    if (ops == 0)
      ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("flash.listen: no operation given")));
  }
  if (!PG_ARGISNULL(2)) {
    cols = column_list(rel, PG_GETARG_ARRAYTYPE_P(2), "columns", &ncols);
    for (int i = 0; i < ncols; i++) named = bms_add_member(named, cols[i]);
  }
  if (!PG_ARGISNULL(7)) {
    pk = column_list(rel, PG_GETARG_ARRAYTYPE_P(7), "primary_key", &npk);
    for (int i = 0; i < npk; i++) named = bms_add_member(named, pk[i]);
  }

  if (!PG_ARGISNULL(3)) {
    Datum *ccol, *copd, *cnd, *cvd = NULL;
    bool *ccn, *copn, *cnn, *cvn = NULL;
    int k2, k3, k4 = 0;
    text_array(PG_GETARG_ARRAYTYPE_P(3), &ccol, &ccn, &ncond);
    if (PG_ARGISNULL(4) || PG_ARGISNULL(5))
      ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("flash.listen: incomplete conditions")));
    text_array(PG_GETARG_ARRAYTYPE_P(4), &copd, &copn, &k2);
    deconstruct_array(PG_GETARG_ARRAYTYPE_P(5), INT4OID, 4, true, TYPALIGN_INT, &cnd, &cnn, &k3);
    if (!PG_ARGISNULL(6)) text_array(PG_GETARG_ARRAYTYPE_P(6), &cvd, &cvn, &k4);
    if (k2 != ncond || k3 != ncond)
      ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                      errmsg("flash.listen: condition arrays differ in length")));
    catt = palloc(sizeof(int16) * (ncond + 1));
    cop = palloc(sizeof(int16) * (ncond + 1));
    cn = palloc(sizeof(int16) * (ncond + 1));
    ctyp = palloc(sizeof(Datum) * (ncond + 1));
    cval = palloc(sizeof(Datum) * (k4 + 1));
    for (int i = 0; i < ncond; i++) {
      const char *colname, *opname;
      Form_pg_attribute att;
      Oid base, input, ioparam, send;
      bool varlena;
      int n, op;
      int32 typmod;
      if (ccn[i] || copn[i] || cnn[i])
        ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("flash.listen: condition %d has a NULL part", i + 1)));
      colname = TextDatumGetCString(ccol[i]);
      opname = TextDatumGetCString(copd[i]);
      n = DatumGetInt32(cnd[i]);
      catt[i] = column_attnum(rel, colname, "conditions");
      named = bms_add_member(named, catt[i]);
      op = op_code(opname);
      if (op == 0)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                        errmsg("flash.listen: condition on column \"%s\": unknown operator '%s' "
                               "(expected =, <>, <, <=, >, >=, in, is null, is not null)", colname, opname)));
      cop[i] = (int16)op;
      if ((op == C_ISNULL || op == C_NOTNULL) ? n != 0 : op == C_IN ? n < 1 : n != 1)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                        errmsg("flash.listen: condition \"%s %s\" takes %s, got %d value(s)", colname, opname,
                               (op == C_ISNULL || op == C_NOTNULL) ? "no value" : op == C_IN ? "a non-empty list" : "one value", n)));
      if (vi + n > k4 || n > PG_INT16_MAX)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("flash.listen: too few condition values")));
      cn[i] = (int16)n;
      att = TupleDescAttr(RelationGetDescr(rel), catt[i] - 1);
      base = getBaseType(att->atttypid);
      ctyp[i] = ObjectIdGetDatum(base);
      if (n == 0) continue;
      check_condition_type(rel, att, base);
      /* Read as CAST(value AS base type) does, with the caller's rights and settings: the
       * base type's, not a domain's, whose CHECK constraints are expressions of the
       * domain's owner (anyone may create a domain and a table using it) that would run
       * with the caller's privileges; the value is compared, never stored, so the domain's
       * constraints have nothing to guard (the Lua side casts to the base type alike).
       * Stored in the base type's binary form, which reads back the same in any session. */
      typmod = att->atttypmod;
      (void)getBaseTypeAndTypmod(att->atttypid, &typmod);
      getTypeInputInfo(base, &input, &ioparam);
      getTypeBinaryOutputInfo(base, &send, &varlena);
      for (int j = 0; j < n; j++, vi++) {
        Datum d;
        if (cvn[vi])
          ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
                          errmsg("flash.listen: condition \"%s %s\" has a NULL value (use is null)", colname, opname)));
        d = OidInputFunctionCall(input, TextDatumGetCString(cvd[vi]), ioparam, typmod);
        cval[vi] = PointerGetDatum(OidSendFunctionCall(send, d));
      }
    }
    nval = vi;
    if (nval != k4)
      ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("flash.listen: too many condition values")));
  }
  check_select(rel, role, named, cols == NULL);

  regid = registry_relid(false);
  seqid = get_relname_relid(FLASH_SEQUENCE, get_namespace_oid(FLASH_SCHEMA, false));
  reg = table_open(regid, RowExclusiveLock);
  if (RelationGetDescr(reg)->natts != R_NATTS)
    ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    errmsg("the flashlua registry does not have the shape of version %s", FLASH_VERSION),
                    errhint("ALTER EXTENSION flashlua UPDATE")));
  id = nextval_internal(seqid, false);
  memset(nulls, 0, sizeof nulls);
  values[R_ID] = Int64GetDatum(id);
  values[R_CONSUMER] = CStringGetTextDatum(consumer);
  values[R_RELID] = ObjectIdGetDatum(relid);
  values[R_OPS] = Int16GetDatum((int16)ops);
  if (cols) values[R_COLS] = int2_array(cols, ncols); else nulls[R_COLS] = true;
  if (pk) values[R_PK] = int2_array(pk, npk); else nulls[R_PK] = true;
  if (ncond > 0) {
    values[R_COND_ATT] = int2_array(catt, ncond);
    values[R_COND_OP] = int2_array(cop, ncond);
    values[R_COND_N] = int2_array(cn, ncond);
    values[R_COND_TYP] = PointerGetDatum(construct_array(ctyp, ncond, OIDOID, 4, true, TYPALIGN_INT));
    values[R_COND_VAL] = PointerGetDatum(construct_array(cval, nval, BYTEAOID, -1, false, TYPALIGN_INT));
  } else {
    nulls[R_COND_ATT] = nulls[R_COND_OP] = nulls[R_COND_N] = nulls[R_COND_TYP] = nulls[R_COND_VAL] = true;
  }
  values[R_OWNER] = ObjectIdGetDatum(role);
  if (PG_ARGISNULL(9)) nulls[R_NOTE] = true; else values[R_NOTE] = PointerGetDatum(PG_GETARG_TEXT_PP(9));
  values[R_CREATED] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
  tup = heap_form_tuple(RelationGetDescr(reg), values, nulls);
  CatalogTupleInsert(reg, tup);
  table_close(reg, NoLock);
  relation_close(rel, NoLock);
  PG_RETURN_INT64(id);
}

/* flash.unlisten(id) -> whether the listener existed */
Datum flash_unlisten(PG_FUNCTION_ARGS) {
  int64 id = PG_GETARG_INT64(0);
  Relation reg = table_open(registry_relid(false), RowExclusiveLock);
  ScanKeyData key;
  SysScanDesc scan;
  HeapTuple tup;
  bool found = false;
  ScanKeyInit(&key, R_ID + 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(id));
  scan = systable_beginscan(reg, InvalidOid, false, NULL, 1, &key);
  if (HeapTupleIsValid(tup = systable_getnext(scan))) {
    bool isnull;
    Oid owner = DatumGetObjectId(heap_getattr(tup, R_OWNER + 1, RelationGetDescr(reg), &isnull));
    if (!has_privs_of_role(GetUserId(), owner))
      ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                      errmsg("flash.unlisten: listener " INT64_FORMAT " belongs to role %s", id,
                             GetUserNameFromId(owner, true) ? GetUserNameFromId(owner, true) : "(dropped)")));
    {
      /* Not CatalogTupleDelete: a concurrent unlisten of the same listener that committed
       * first makes this one find nothing (false), rather than fail. */
      TM_FailureData tmfd;
      TM_Result r = heap_delete(reg, &tup->t_self, GetCurrentCommandId(true), InvalidSnapshot, true, &tmfd, false);
      if (r == TM_Ok) found = true;
      else if (r != TM_Deleted && r != TM_Updated && r != TM_SelfModified)
        elog(ERROR, "flash.unlisten: unexpected result %d deleting listener " INT64_FORMAT, (int)r, id);
    }
  }
  systable_endscan(scan);
  table_close(reg, NoLock);
  PG_RETURN_BOOL(found);
}

/* ------------------------------------------------------------------------------------ */
/* The output plugin */

/* One registry row of this consumer. Attnums are the listened table's. */
typedef struct {
  int64 id;
  Oid relid;
  int ops;
  int ncols, npk, ncond;
  int16 *cols, *pk;            /* cols NULL: every column */
  int16 *catt, *cop, *cn;
  Oid *ctyp;
  bytea **cval;                /* flattened, ncond entries' cn[i] each */
} Listener;

typedef struct {
  AttrNumber att;              /* the leaf relation's */
  int op, nvals;
  Datum *vals;
  int16 typlen;
  Oid coll;
  FmgrInfo cmp;
} Cond;

/* A listener compiled for one (leaf) relation. */
typedef struct {
  Listener *l;
  bool broken;                 /* a condition's column is gone or retyped: it matches nothing */
  int ncols, npk, ncond;
  AttrNumber *cols, *pk;       /* cols NULL: every column; a gone column is InvalidAttrNumber */
  Cond *conds;
  int nwarn;                   /* what the client is told about gone columns ('W' messages) */
  char *warn_kind;             /*   'f' a column of `columns`, 'k' of primary_key, 'c' of a condition, */
  int16 *warn_at;              /*   't' a condition's column retyped; at: 0-based position in that list */
} RelListener;

/* At most this many columns of an insert are fetched one by one for its tests (heap_getattr,
 * whose offsets the descriptor caches while the columns before have a fixed size); more
 * are deformed at once. */
#define MAX_FETCHED 4

typedef struct {
  Oid relid;                   /* hash key */
  bool valid;
  bool rel_sent;               /* the Relation message went out since the entry was built */
  bool warned;                 /* its listeners' 'W' messages went out since then */
  MemoryContext cxt;
  int n;
  RelListener *ls;
  int nsend;
  AttrNumber *send;            /* the columns frames carry: the union of the listeners' */
  FmgrInfo *out;               /* their types' output functions, or send functions (B_SEND, B_NUMERIC) */
  char *how;                   /* per sent column: how its values go out (enum Send) */
  /* Listeners indexed by value: those with an = or in condition on column ix_att are found
   * by hashing the row's value (the type's hash function and the column's collation), so a
   * change is tested against the listeners its value names, plus the `rest`. */
  AttrNumber ix_att;           /* InvalidAttrNumber: no index, every listener is tested */
  int16 ix_typlen;
  Oid ix_coll;
  FmgrInfo ix_hash, ix_cmp;
  uint32 ix_mask;              /* buckets - 1 (a power of 2) */
  int *ix_head;                /* per bucket: the first slot, or -1 */
  struct IndexSlot *ix_slots;
  int nrest;
  int *rest;                   /* listeners (positions in ls) not in the index, in order */
  /* What change_cb needs per change, allocated once: the deformed rows (natts values),
   * the listener ids of each outcome (4 x n), the candidates (as candidates() says) and
   * every listener's position (0 .. n-1). */
  int natts;
  Datum *nv, *ov;
  bool *nn, *on;
  int64 *ids[4];               /* per outcome (G_UPDATE .. G_SPLIT) */
  int *cand, *every;
  int ntest;                   /* the columns an insert is tested on (conditions, the index) */
  AttrNumber test[MAX_FETCHED];
} RelEntry;

typedef struct IndexSlot {
  uint32 hash;
  int listener;                /* position in ls */
  Datum val;
  int next;                    /* next slot of the bucket, or -1 */
} IndexSlot;

typedef struct {
  MemoryContext cachecxt, changecxt;
  char *consumer;
  bool loaded;                 /* listeners read under the current snapshot */
  bool stale;                  /* the registry itself was invalidated: read it again */
  Oid registry;
  List *listeners;
  HTAB *rels;
  RelEntry *last;              /* the entry of the last change (most changes are of its relation) */
  bool begun;                  /* Begin sent for the current transaction */
  bool sticky;                 /* option sticky_tags: a tag holds until the next one or the Commit */
  bool binary;                 /* option binary: built-in types the client reads go in their send form */
  bool streaming;              /* option streaming: large in-progress transactions are streamed */
  bool in_stream;              /* between stream_start and stream_stop */
  bool stream_opened;          /* ...and its Stream Start went out (sent before its first frame) */
  TransactionId stream_xid;    /* the streamed (top-level) transaction */
  List *streamed;              /* top-level xids with a block sent: their commit or abort goes out */
  int64 *last_tag;             /* ...and the last one sent in this transaction (last_n < 0: none) */
  int last_n, last_cap;
  uint64 nomatch;              /* values a condition could not be tested on, counted as no match */
  uint64 nomatch_sent;         /* ...of which the client was told ('N' messages) */
  uint32 skipped;
  LogicalOutputPluginWriterWrite send_write;   /* the walsender's write (held_write) */
  int held;                    /* bytes of frames held in the output buffer, not yet sent */
  TimestampTz held_at;         /* their send time */
} FlashData;

static FlashData *active_data;  /* for the relcache callback (one decoding context per process) */

static void rel_inval(Datum arg, Oid relid) {
  FlashData *d = active_data;
  RelEntry *e;
  if (!d || !d->rels) return;
  if (!OidIsValid(relid) || relid == d->registry) d->stale = true;
  if (!OidIsValid(relid)) {
    HASH_SEQ_STATUS st;
    hash_seq_init(&st, d->rels);
    while ((e = hash_seq_search(&st)) != NULL) e->valid = false;
    return;
  }
  e = hash_search(d->rels, &relid, HASH_FIND, NULL);
  if (e) e->valid = false;
}

static void reset_cache(FlashData *d) {
  HASHCTL ctl;
  MemoryContextReset(d->cachecxt);
  d->listeners = NIL;
  d->last = NULL;
  d->loaded = false;
  d->stale = false;
  memset(&ctl, 0, sizeof ctl);
  ctl.keysize = sizeof(Oid);
  ctl.entrysize = sizeof(RelEntry);
  ctl.hcxt = d->cachecxt;
  d->rels = hash_create("flashlua relations", 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

static int16 *int2_elems(Datum a, int *n) {
  Datum *e;
  int16 *out;
  deconstruct_array(DatumGetArrayTypeP(a), INT2OID, 2, true, TYPALIGN_SHORT, &e, NULL, n);
  out = palloc(sizeof(int16) * (*n + 1));
  for (int i = 0; i < *n; i++) out[i] = DatumGetInt16(e[i]);
  return out;
}

/* lookup_type_cache while a transaction in progress is streamed. PostgreSQL 15's
 * GetDefaultOpClass looks casts up in the syscache from inside its scan of pg_opclass; the
 * nested scan's end clears the permission to read catalogs that the outer scan holds
 * (bsysscan), whose next row then raises "unexpected table_index_fetch_tuple call during
 * logical decoding". The types asked about here are built-in (conditions and the value
 * index take only those), whose operator classes no transaction can change, so they are
 * looked up without the check for a concurrent abort of the streamed transaction. */
static TypeCacheEntry *type_cache(Oid typ, int flags) {
  TransactionId alive = CheckXidAlive;
  TypeCacheEntry *tc = NULL;
  CheckXidAlive = InvalidTransactionId;
  PG_TRY();
  {
    tc = lookup_type_cache(typ, flags);
  }
  PG_FINALLY();
  {
    CheckXidAlive = alive;
  }
  PG_END_TRY();
  return tc;
}

/* Reads this consumer's listeners from the registry under the historic snapshot. The
 * rows are copied during the scan and read after it: reading one may fetch a TOASTed value
 * (a nested scan), which must not happen inside the scan while a transaction in progress is
 * streamed (see type_cache). */
static void load_listeners(FlashData *d) {
  MemoryContext old = MemoryContextSwitchTo(d->cachecxt);
  Relation reg;
  SysScanDesc scan;
  HeapTuple tup;
  List *rows = NIL;
  ListCell *lc;
  d->loaded = true;
  d->registry = registry_relid(true);
  if (!OidIsValid(d->registry)) { MemoryContextSwitchTo(old); return; }
  reg = table_open(d->registry, AccessShareLock);
  if (RelationGetDescr(reg)->natts != R_NATTS) {
    table_close(reg, AccessShareLock);
    MemoryContextSwitchTo(old);
    return;
  }
  scan = systable_beginscan(reg, InvalidOid, false, NULL, 0, NULL);
  while (HeapTupleIsValid(tup = systable_getnext(scan))) rows = lappend(rows, heap_copytuple(tup));
  systable_endscan(scan);
  foreach (lc, rows) {
    Datum v[R_NATTS];
    bool n[R_NATTS];
    Listener *l;
    char *consumer;
    tup = lfirst(lc);
    heap_deform_tuple(tup, RelationGetDescr(reg), v, n);
    consumer = TextDatumGetCString(v[R_CONSUMER]);
    if (strcmp(consumer, d->consumer) != 0) continue;
    l = palloc0(sizeof *l);
    l->id = DatumGetInt64(v[R_ID]);
    l->relid = DatumGetObjectId(v[R_RELID]);
    l->ops = DatumGetInt16(v[R_OPS]);
    if (!n[R_COLS]) l->cols = int2_elems(v[R_COLS], &l->ncols);
    if (!n[R_PK]) l->pk = int2_elems(v[R_PK], &l->npk);
    if (!n[R_COND_ATT] && !n[R_COND_OP] && !n[R_COND_N] && !n[R_COND_TYP] && !n[R_COND_VAL]) {
      Datum *e;
      int k, nv;
      l->catt = int2_elems(v[R_COND_ATT], &l->ncond);
      l->cop = int2_elems(v[R_COND_OP], &k);
      l->cn = int2_elems(v[R_COND_N], &k);
      deconstruct_array(DatumGetArrayTypeP(v[R_COND_TYP]), OIDOID, 4, true, TYPALIGN_INT, &e, NULL, &k);
      l->ctyp = palloc(sizeof(Oid) * (k + 1));
      for (int i = 0; i < k; i++) l->ctyp[i] = DatumGetObjectId(e[i]);
      deconstruct_array(DatumGetArrayTypeP(v[R_COND_VAL]), BYTEAOID, -1, false, TYPALIGN_INT, &e, NULL, &nv);
      l->cval = palloc(sizeof(bytea *) * (nv + 1));
      for (int i = 0; i < nv; i++) l->cval[i] = DatumGetByteaPCopy(e[i]);
    }
    d->listeners = lappend(d->listeners, l);
  }
  table_close(reg, AccessShareLock);
  MemoryContextSwitchTo(old);
}

/* The leaf relation's attnum of listened table `relid`'s column `att` (they differ between
 * a parent and its partitions or children), or InvalidAttrNumber when it is gone. */
static AttrNumber leaf_att(Oid relid, TupleDesc desc, Oid leaf, AttrNumber att) {
  char *name;
  if (relid == leaf) {
    if (att < 1 || att > desc->natts || TupleDescAttr(desc, att - 1)->attisdropped) return InvalidAttrNumber;
    return att;
  }
  name = get_attname(relid, att, true);      /* a dropped column's name matches nothing live */
  return name ? get_attnum(leaf, name) : InvalidAttrNumber;
}

static void warn_later(RelListener *rl, char kind, int at) {
  rl->warn_kind[rl->nwarn] = kind;
  rl->warn_at[rl->nwarn++] = (int16)at;
}

/* A column of `columns` or primary_key that is gone is left out (events no longer carry
 * it, as under wal_logical); a condition whose column is gone or retyped cannot be tested:
 * the listener matches nothing. Either way the client is told (send_warnings). */
static void compile(RelListener *rl, Listener *l, Relation rel) {
  Oid leaf = RelationGetRelid(rel);
  TupleDesc desc = RelationGetDescr(rel);
  int vi = 0;
  rl->l = l;
  rl->warn_kind = palloc(l->ncols + l->npk + l->ncond + 1);
  rl->warn_at = palloc(sizeof(int16) * (l->ncols + l->npk + l->ncond + 1));
  if (l->cols) {
    rl->ncols = l->ncols;
    rl->cols = palloc(sizeof(AttrNumber) * l->ncols);
    for (int i = 0; i < l->ncols; i++)
      if ((rl->cols[i] = leaf_att(l->relid, desc, leaf, l->cols[i])) == InvalidAttrNumber) warn_later(rl, 'f', i);
  }
  rl->npk = l->npk;
  rl->pk = palloc(sizeof(AttrNumber) * (l->npk + 1));
  for (int i = 0; i < l->npk; i++)
    if ((rl->pk[i] = leaf_att(l->relid, desc, leaf, l->pk[i])) == InvalidAttrNumber) warn_later(rl, 'k', i);
  rl->ncond = l->ncond;
  rl->conds = palloc0(sizeof(Cond) * (l->ncond + 1));
  for (int i = 0; i < l->ncond; i++) {
    Cond *c = &rl->conds[i];
    Form_pg_attribute att;
    c->op = l->cop[i];
    c->nvals = l->cn[i];
    c->att = leaf_att(l->relid, desc, leaf, l->catt[i]);
    if (c->att == InvalidAttrNumber) { rl->broken = true; warn_later(rl, 'c', i); vi += c->nvals; continue; }
    att = TupleDescAttr(desc, c->att - 1);
    /* A column retyped since the listen: its constants mean nothing now. */
    if (getBaseType(att->atttypid) != l->ctyp[i]) { rl->broken = true; warn_later(rl, 't', i); vi += c->nvals; continue; }
    c->typlen = att->attlen;
    c->coll = att->attcollation;
    if (c->nvals == 0) continue;
    {
      TypeCacheEntry *tc = type_cache(l->ctyp[i], TYPECACHE_CMP_PROC);
      Oid recv, ioparam;
      if (!OidIsValid(tc->cmp_proc) || tc->cmp_proc >= FirstNormalObjectId) {
        rl->broken = true; warn_later(rl, 't', i); vi += c->nvals; continue;
      }
      fmgr_info_cxt(tc->cmp_proc, &c->cmp, CurrentMemoryContext);
      getTypeBinaryInputInfo(l->ctyp[i], &recv, &ioparam);
      c->vals = palloc(sizeof(Datum) * c->nvals);
      for (int j = 0; j < c->nvals; j++, vi++) {
        StringInfoData buf;
        initStringInfo(&buf);
        appendBinaryStringInfo(&buf, VARDATA_ANY(l->cval[vi]), VARSIZE_ANY_EXHDR(l->cval[vi]));
        c->vals[j] = OidReceiveFunctionCall(recv, &buf, ioparam, -1);
      }
    }
  }
}

/* Every ancestor of relid through pg_inherits: partitioned tables' and INHERITS parents'
 * (multiple inheritance included), read under the decoding's historic snapshot. */
static List *ancestors(Oid relid) {
  List *out = NIL, *todo = list_make1_oid(relid);
  Relation inh = table_open(InheritsRelationId, AccessShareLock);
  while (todo != NIL) {
    Oid cur = linitial_oid(todo);
    ScanKeyData key;
    SysScanDesc scan;
    HeapTuple tup;
    todo = list_delete_first(todo);
    ScanKeyInit(&key, Anum_pg_inherits_inhrelid, BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(cur));
    scan = systable_beginscan(inh, InheritsRelidSeqnoIndexId, true, NULL, 1, &key);
    while (HeapTupleIsValid(tup = systable_getnext(scan))) {
      Oid parent = ((Form_pg_inherits)GETSTRUCT(tup))->inhparent;
      if (!list_member_oid(out, parent)) {
        out = lappend_oid(out, parent);
        todo = lappend_oid(todo, parent);
      }
    }
    systable_endscan(scan);
  }
  table_close(inh, AccessShareLock);
  return out;
}

static void build_index(RelEntry *e, TupleDesc desc);
static bool is_ondisk(int16 typlen, Datum v);

/* How a column's values go out. With the option binary, the built-in types the client
 * reads exactly from their send form (src/core/fl_binary.c: fl_bin_supported, and the
 * arrays lvalue knows) go in it: fixed-size ones and text-like ones written here as their
 * send functions write them (text-like only when no encoding conversion is due), the rest
 * through the send function. Every other type, domains included, goes as text. */
enum Send { B_TEXT, B_SEND, B_BOOL, B_CHAR, B_INT2, B_INT4, B_INT8, B_UUID, B_BYTES, B_NAME, B_INTERVAL, B_NUMERIC };

static char send_how(Oid typ) {
  bool same_encoding = pg_get_client_encoding() == GetDatabaseEncoding();
  switch (typ) {
    case BOOLOID: return B_BOOL;
    case CHAROID: return B_CHAR;
    case INT2OID: return B_INT2;
    case INT4OID: case OIDOID: case FLOAT4OID: case DATEOID: return B_INT4;
    case INT8OID: case FLOAT8OID: case TIMEOID: case TIMESTAMPOID: case TIMESTAMPTZOID: return B_INT8;
    case UUIDOID: return B_UUID;
    case INTERVALOID: return B_INTERVAL;
    case NUMERICOID: return B_NUMERIC;
    case BYTEAOID: return B_BYTES;
    case TEXTOID: case VARCHAROID: case BPCHAROID: case JSONOID: return same_encoding ? B_BYTES : B_SEND;
    case NAMEOID: return same_encoding ? B_NAME : B_SEND;
    case TIMETZOID: case JSONBOID:
    case BOOLARRAYOID: case BYTEAARRAYOID: case INT8ARRAYOID: case INT2ARRAYOID: case INT4ARRAYOID:
    case OIDARRAYOID: case FLOAT4ARRAYOID: case FLOAT8ARRAYOID: case NUMERICARRAYOID: case JSONARRAYOID:
    case JSONBARRAYOID: case TEXTARRAYOID: case VARCHARARRAYOID: case BPCHARARRAYOID: case UUIDARRAYOID:
    case TIMESTAMPARRAYOID: case TIMESTAMPTZARRAYOID: case DATEARRAYOID: case TIMEARRAYOID: case NAMEARRAYOID:
    case INTERVALARRAYOID:
      return B_SEND;
    default:
      return B_TEXT;
  }
}

/* The listeners of a relation's rows (its own and its ancestors'), compiled and indexed. */
static RelEntry *get_entry(FlashData *d, Relation rel) {
  Oid relid = RelationGetRelid(rel);
  bool found;
  RelEntry *e;
  List *targets;
  ListCell *lc;
  MemoryContext old;
  Bitmapset *send = NULL;
  bool all = false;
  TupleDesc desc = RelationGetDescr(rel);

  if (d->stale) reset_cache(d);
  if (d->last && d->last->valid && d->last->relid == relid && d->last->natts == desc->natts) return d->last;
  if (!d->loaded) load_listeners(d);
  e = hash_search(d->rels, &relid, HASH_ENTER, &found);
  d->last = e;
  if (found && e->valid && e->natts == desc->natts) return e;
  if (found && e->cxt) MemoryContextDelete(e->cxt);
  e->valid = true;
  e->rel_sent = false;
  e->warned = false;
  e->n = 0;
  e->ls = NULL;
  e->nsend = 0;
  e->send = NULL;
  e->cxt = AllocSetContextCreate(d->cachecxt, "flashlua relation", ALLOCSET_SMALL_SIZES);
  old = MemoryContextSwitchTo(e->cxt);
  targets = list_make1_oid(relid);
  targets = list_concat(targets, ancestors(relid));
  foreach (lc, d->listeners) {
    Listener *l = lfirst(lc);
    if (list_member_oid(targets, l->relid)) e->n++;
  }
  e->ls = palloc0(sizeof(RelListener) * (e->n + 1));
  e->n = 0;
  foreach (lc, d->listeners) {
    Listener *l = lfirst(lc);
    RelListener *rl;
    if (!list_member_oid(targets, l->relid)) continue;
    rl = &e->ls[e->n++];
    compile(rl, l, rel);
    if (!rl->cols) all = true;
    else
      for (int i = 0; i < rl->ncols; i++)
        if (rl->cols[i] != InvalidAttrNumber) send = bms_add_member(send, rl->cols[i]);
  }
  e->send = palloc(sizeof(AttrNumber) * (desc->natts + 1));
  for (int i = 0; i < desc->natts; i++) {
    Form_pg_attribute a = TupleDescAttr(desc, i);
    if (a->attisdropped) continue;        /* stored generated columns are sent too */
    if (all || bms_is_member(a->attnum, send)) e->send[e->nsend++] = a->attnum;
  }
  e->out = palloc(sizeof(FmgrInfo) * (e->nsend + 1));
  e->how = palloc(e->nsend + 1);
  for (int i = 0; i < e->nsend; i++) {
    Oid typ = TupleDescAttr(desc, e->send[i] - 1)->atttypid, f;
    bool varlena;
    e->how[i] = d->binary ? send_how(typ) : B_TEXT;
    if (e->how[i] == B_SEND || e->how[i] == B_NUMERIC) getTypeBinaryOutputInfo(typ, &f, &varlena);
    else getTypeOutputInfo(typ, &f, &varlena);
    fmgr_info_cxt(f, &e->out[i], CurrentMemoryContext);
  }
  build_index(e, desc);
  e->natts = desc->natts;
  e->nv = palloc(sizeof(Datum) * (e->natts + 1));
  e->ov = palloc(sizeof(Datum) * (e->natts + 1));
  e->nn = palloc(sizeof(bool) * (e->natts + 1));
  e->on = palloc(sizeof(bool) * (e->natts + 1));
  e->ntest = 0;
  {
    Bitmapset *test = e->ix_att != InvalidAttrNumber ? bms_make_singleton(e->ix_att) : NULL;
    int a = -1;
    for (int i = 0; i < e->n; i++)
      for (int j = 0; j < e->ls[i].ncond; j++)
        if (e->ls[i].conds[j].att != InvalidAttrNumber) test = bms_add_member(test, e->ls[i].conds[j].att);
    if (bms_num_members(test) > MAX_FETCHED) e->ntest = -1;
    else
      while ((a = bms_next_member(test, a)) >= 0) e->test[e->ntest++] = (AttrNumber)a;
  }
  for (int g = 0; g < 4; g++) e->ids[g] = palloc(sizeof(int64) * (e->n + 1));
  e->cand = palloc(sizeof(int) * (e->n + (e->ix_att != InvalidAttrNumber ? 2 * ((int)e->ix_mask + 1) : 0) + 1));
  e->every = palloc(sizeof(int) * (e->n + 1));
  for (int i = 0; i < e->n; i++) e->every[i] = i;
  MemoryContextSwitchTo(old);
  return e;
}

/* --- listeners indexed by value -------------------------------------------------------- */

/* The = or in condition of rl on column att that the index can hold, or NULL. */
static Cond *index_cond(RelListener *rl, AttrNumber att) {
  if (rl->broken) return NULL;
  for (int i = 0; i < rl->ncond; i++) {
    Cond *c = &rl->conds[i];
    if (c->att == att && (c->op == C_EQ || c->op == C_IN) && c->nvals > 0) return c;
  }
  return NULL;
}

/* Picks the column that most listeners test with = or in, when at least two do and its
 * type has a built-in hash function (which agrees with its btree equality), and hashes
 * their values. In the entry's memory context. */
static void build_index(RelEntry *e, TupleDesc desc) {
  int best = 0, bestn = 0, nslots = 0, nb = 1, s = 0;
  TypeCacheEntry *tc;
  Form_pg_attribute a;
  e->ix_att = InvalidAttrNumber;
  e->ix_mask = 0;
  e->nrest = 0;
  for (int k = 1; k <= desc->natts; k++) {
    int n = 0;
    for (int i = 0; i < e->n; i++)
      if (index_cond(&e->ls[i], k)) n++;
    if (n > bestn) { best = k; bestn = n; }
  }
  if (bestn < 2) return;
  a = TupleDescAttr(desc, best - 1);
  tc = type_cache(getBaseType(a->atttypid), TYPECACHE_HASH_PROC | TYPECACHE_CMP_PROC);
  if (!OidIsValid(tc->hash_proc) || tc->hash_proc >= FirstNormalObjectId || !OidIsValid(tc->cmp_proc) ||
      tc->cmp_proc >= FirstNormalObjectId)
    return;
  e->ix_att = best;
  e->ix_typlen = a->attlen;
  e->ix_coll = a->attcollation;
  fmgr_info_cxt(tc->hash_proc, &e->ix_hash, CurrentMemoryContext);
  fmgr_info_cxt(tc->cmp_proc, &e->ix_cmp, CurrentMemoryContext);
  e->rest = palloc(sizeof(int) * (e->n + 1));
  for (int i = 0; i < e->n; i++) {
    Cond *c = index_cond(&e->ls[i], best);
    if (c) nslots += c->nvals;
    else e->rest[e->nrest++] = i;
  }
  while (nb < 2 * nslots) nb <<= 1;
  e->ix_mask = (uint32)(nb - 1);
  e->ix_head = palloc(sizeof(int) * nb);
  for (int b = 0; b < nb; b++) e->ix_head[b] = -1;
  e->ix_slots = palloc(sizeof(IndexSlot) * nslots);
  for (int i = 0; i < e->n; i++) {
    Cond *c = index_cond(&e->ls[i], best);
    if (!c) continue;
    for (int j = 0; j < c->nvals; j++, s++) {
      IndexSlot *sl = &e->ix_slots[s];
      uint32 b;
      sl->hash = DatumGetUInt32(FunctionCall1Coll(&e->ix_hash, e->ix_coll, c->vals[j]));
      sl->listener = i;
      sl->val = c->vals[j];
      b = sl->hash & e->ix_mask;
      sl->next = e->ix_head[b];
      e->ix_head[b] = s;
    }
  }
}

/* Adds to out the listeners whose indexed values equal the row's value; false when the
 * value cannot be hashed here (an unchanged TOASTed value absent from the WAL). */
static bool index_lookup(RelEntry *e, Datum *v, bool *isnull, int *out, int *n) {
  int k = e->ix_att - 1;
  uint32 h;
  if (isnull[k]) return true;                 /* = and in never match NULL */
  if (is_ondisk(e->ix_typlen, v[k])) return false;
  h = DatumGetUInt32(FunctionCall1Coll(&e->ix_hash, e->ix_coll, v[k]));
  for (int s = e->ix_head[h & e->ix_mask]; s >= 0; s = e->ix_slots[s].next) {
    IndexSlot *sl = &e->ix_slots[s];
    if (sl->hash == h && DatumGetInt32(FunctionCall2Coll(&e->ix_cmp, e->ix_coll, v[k], sl->val)) == 0)
      out[(*n)++] = sl->listener;
  }
  return true;
}

static int cmp_int(const void *x, const void *y) {
  int a = *(const int *)x, b = *(const int *)y;
  return a < b ? -1 : a > b;
}

/* The listeners (positions in e->ls, ascending) a change has to be tested against: with
 * an index, the rest and those whose values the new or old row names; else all. */
static int *candidates(RelEntry *e, int action, bool full, Datum *nv, bool *nn, Datum *ov, bool *on, int *count) {
  /* the rest and two lookups' hits: at most n + 2 * slots, and slots <= buckets / 2 */
  int *out = e->cand;
  int n = 0, u = 0;
  bool ok = e->ix_att != InvalidAttrNumber;
  if (ok) {
    memcpy(out, e->rest, sizeof(int) * e->nrest);
    n = e->nrest;
    if (action == REORDER_BUFFER_CHANGE_DELETE && !full) ok = false;   /* conditions are not tested */
    if (ok && nv) ok = index_lookup(e, nv, nn, out, &n);
    if (ok && full && ov) ok = index_lookup(e, ov, on, out, &n);
  }
  if (!ok) {
    *count = e->n;
    return e->every;
  }
  qsort(out, n, sizeof(int), cmp_int);
  for (int i = 0; i < n; i++)
    if (u == 0 || out[u - 1] != out[i]) out[u++] = out[i];
  *count = u;
  return out;
}

/* --- writing frames ------------------------------------------------------------------- */

/* Starts a frame of type `kind`. In a streamed block (pgoutput protocol 2) a Stream Start
 * goes out before its first frame, and every frame carries an xid after its type: the
 * change's (sub)transaction for a change, so the client drops it when that subtransaction
 * aborts, and the top-level one for the rest (tags, relations, messages). */
static void frame_start(LogicalDecodingContext *ctx, char kind, TransactionId xid) {
  FlashData *d = ctx->output_plugin_private;
  if (d->in_stream && !d->stream_opened) {
    bool first = !list_member_oid(d->streamed, d->stream_xid);
    MemoryContext old;
    if (first) {
      old = MemoryContextSwitchTo(ctx->context);
      d->streamed = lappend_oid(d->streamed, d->stream_xid);
      MemoryContextSwitchTo(old);
    }
    d->stream_opened = true;
    OutputPluginPrepareWrite(ctx, true);
    pq_sendbyte(ctx->out, 'S');
    pq_sendint32(ctx->out, d->stream_xid);
    pq_sendbyte(ctx->out, first ? 1 : 0);
    OutputPluginWrite(ctx, true);
  }
  OutputPluginPrepareWrite(ctx, false);
  pq_sendbyte(ctx->out, kind);
  if (d->in_stream) pq_sendint32(ctx->out, OidIsValid(xid) ? xid : d->stream_xid);
}

static void send_begin(LogicalDecodingContext *ctx, ReorderBufferTXN *txn) {
  FlashData *d = ctx->output_plugin_private;
  if (d->begun || d->in_stream) return;     /* a streamed transaction's frames need none */
  d->begun = true;
  OutputPluginPrepareWrite(ctx, false);
  pq_sendbyte(ctx->out, 'B');
  pq_sendint64(ctx->out, txn->final_lsn);
  pq_sendint64(ctx->out, txn->xact_time.commit_time);
  pq_sendint32(ctx->out, txn->xid);
  OutputPluginWrite(ctx, false);
}

static void send_relation(LogicalDecodingContext *ctx, Relation rel, RelEntry *e) {
  TupleDesc desc = RelationGetDescr(rel);
  Bitmapset *key = RelationGetIdentityKeyBitmap(rel);
  char *nsp = get_namespace_name(RelationGetNamespace(rel));
  frame_start(ctx, 'R', InvalidTransactionId);
  pq_sendint32(ctx->out, RelationGetRelid(rel));
  pq_sendstring(ctx->out, nsp ? nsp : "");
  pq_sendstring(ctx->out, RelationGetRelationName(rel));
  pq_sendbyte(ctx->out, rel->rd_rel->relreplident);
  pq_sendint16(ctx->out, e->nsend);
  for (int i = 0; i < e->nsend; i++) {
    Form_pg_attribute a = TupleDescAttr(desc, e->send[i] - 1);
    pq_sendbyte(ctx->out, bms_is_member(a->attnum - FirstLowInvalidHeapAttributeNumber, key) ? 1 : 0);
    pq_sendstring(ctx->out, NameStr(a->attname));
    pq_sendint32(ctx->out, a->atttypid);
    pq_sendint32(ctx->out, a->atttypmod);
  }
  OutputPluginWrite(ctx, false);
  e->rel_sent = true;
}

/* A flashlua logical message (pgoutput 'M', transactional, prefix "flashlua"): its first
 * byte says what it is ('L' tag, 'W' gone columns, 'A' active, 'N' no-match count). */
static void message_begin(LogicalDecodingContext *ctx, XLogRecPtr lsn, char kind, int len) {
  frame_start(ctx, 'M', InvalidTransactionId);
  pq_sendbyte(ctx->out, 1);
  pq_sendint64(ctx->out, lsn);
  pq_sendstring(ctx->out, FLASH_TAG_PREFIX);
  pq_sendint32(ctx->out, 1 + len);
  pq_sendbyte(ctx->out, kind);
}

/* Once per relation entry: the listeners whose named columns are gone or retyped, as 'W',
 * listener id (int64), count (int16), then per column its list ('f' columns, 'k'
 * primary_key, 'c' condition column gone, 't' condition column retyped) and 0-based
 * position in it (int16). The client names the columns in a warning. */
static void send_warnings(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr lsn, RelEntry *e) {
  e->warned = true;
  for (int i = 0; i < e->n; i++) {
    RelListener *rl = &e->ls[i];
    if (rl->nwarn == 0) continue;
    send_begin(ctx, txn);
    message_begin(ctx, lsn, 'W', 8 + 2 + 3 * rl->nwarn);
    pq_sendint64(ctx->out, rl->l->id);
    pq_sendint16(ctx->out, rl->nwarn);
    for (int k = 0; k < rl->nwarn; k++) {
      pq_sendbyte(ctx->out, rl->warn_kind[k]);
      pq_sendint16(ctx->out, rl->warn_at[k]);
    }
    OutputPluginWrite(ctx, false);
  }
}

/* The frame that says which listeners the next change message is for: a pgoutput Message
 * with prefix "flashlua", content 'L' followed by the listener ids (int64 each). */
static void send_tag(LogicalDecodingContext *ctx, XLogRecPtr lsn, int64 *ids, int n) {
  FlashData *d = ctx->output_plugin_private;
  if (d->sticky) {
    /* The client keeps a tag for the following changes of the transaction: one that
     * repeats the last is not sent (a transaction of rows for the same listeners has one). */
    if (d->last_n == n && memcmp(d->last_tag, ids, sizeof(int64) * n) == 0) return;
    if (n > d->last_cap) {
      d->last_tag = MemoryContextAlloc(ctx->context, sizeof(int64) * n * 2);
      d->last_cap = n * 2;
    }
    memcpy(d->last_tag, ids, sizeof(int64) * n);
    d->last_n = n;
  }
  message_begin(ctx, lsn, 'L', 8 * n);
  for (int i = 0; i < n; i++) pq_sendint64(ctx->out, ids[i]);
  OutputPluginWrite(ctx, false);
}

static bool is_ondisk(int16 typlen, Datum v) {
  return typlen == -1 && VARATT_IS_EXTERNAL_ONDISK(DatumGetPointer(v));
}

/* The most a fixed-size value takes in a tuple: its kind, length and up to 16 bytes. */
#define VALUE_ROOM (1 + 4 + 16)

/* A value of len bytes (kind 't' or 'b'), with room for the `after` values that follow. */
static void send_bytes(StringInfo out, char kind, const char *data, int len, int after) {
  enlargeStringInfo(out, 1 + 4 + len + after * VALUE_ROOM);
  pq_writeint8(out, (uint8)kind);
  pq_writeint32(out, (uint32)len);
  memcpy(out->data + out->len, data, len);
  out->len += len;
  out->data[out->len] = '\0';
}

/* numeric's send form as numeric_send writes it (digit count, weight, sign, display scale,
 * then the base-10000 digits, int16 each), read from the value's short or long header
 * (numeric.c's on-disk layout). False for what numeric_send is left to write: NaN and the
 * infinities (their header is neither) and a compressed value. */
static bool send_numeric(StringInfo out, Datum v, int after) {
  struct varlena *p = (struct varlena *)DatumGetPointer(v);
  const char *data;
  int size, head, ndigits, weight, sign, dscale;
  uint16 h;
  if (VARATT_IS_EXTERNAL(p) || VARATT_IS_COMPRESSED(p)) return false;
  data = VARDATA_ANY(p);
  size = VARSIZE_ANY_EXHDR(p);
  if (size < 2) return false;
  memcpy(&h, data, sizeof h);
  if ((h & 0xC000) == 0xC000) return false;           /* NUMERIC_SPECIAL */
  if (h & 0x8000) {                                   /* NUMERIC_SHORT */
    head = 2;
    sign = (h & 0x2000) ? 0x4000 : 0x0000;
    dscale = (h & 0x1F80) >> 7;
    weight = ((h & 0x0040) ? ~0x003F : 0) | (h & 0x003F);
  } else {                                            /* sign and dscale, then weight */
    int16 w;
    if (size < 4) return false;
    head = 4;
    sign = h & 0xC000;
    dscale = h & 0x3FFF;
    memcpy(&w, data + 2, sizeof w);
    weight = w;
  }
  ndigits = (size - head) / 2;
  enlargeStringInfo(out, 1 + 4 + 8 + 2 * ndigits + after * VALUE_ROOM);
  pq_writeint8(out, 'b');
  pq_writeint32(out, (uint32)(8 + 2 * ndigits));
  pq_writeint16(out, (uint16)ndigits);
  pq_writeint16(out, (uint16)weight);
  pq_writeint16(out, (uint16)sign);
  pq_writeint16(out, (uint16)dscale);
  for (int i = 0; i < ndigits; i++) {
    int16 digit;
    memcpy(&digit, data + head + 2 * i, sizeof digit);
    pq_writeint16(out, (uint16)digit);
  }
  return true;
}

/* The buffer is enlarged once for the fixed-size values (and once more per variable one),
 * which are then written without a check each. */
static void send_tuple(StringInfo out, TupleDesc desc, RelEntry *e, Datum *v, bool *isnull) {
  enlargeStringInfo(out, 2 + e->nsend * VALUE_ROOM);
  pq_writeint16(out, e->nsend);
  for (int i = 0; i < e->nsend; i++) {
    int k = e->send[i] - 1, after = e->nsend - i - 1;
    Form_pg_attribute a = TupleDescAttr(desc, k);
    char *s;
    if (isnull[k]) { pq_writeint8(out, 'n'); continue; }
    /* An unchanged TOASTed value the WAL does not carry. */
    if (is_ondisk(a->attlen, v[k])) { pq_writeint8(out, 'u'); continue; }
    switch (e->how[i]) {
      case B_TEXT:
        s = OutputFunctionCall(&e->out[i], v[k]);
        send_bytes(out, 't', s, strlen(s), after);
        break;
      case B_BOOL:
        pq_writeint8(out, 'b');
        pq_writeint32(out, 1);
        pq_writeint8(out, DatumGetBool(v[k]) ? 1 : 0);
        break;
      case B_CHAR:
        pq_writeint8(out, 'b');
        pq_writeint32(out, 1);
        pq_writeint8(out, (uint8)DatumGetChar(v[k]));
        break;
      case B_INT2:
        pq_writeint8(out, 'b');
        pq_writeint32(out, 2);
        pq_writeint16(out, (uint16)DatumGetInt16(v[k]));
        break;
      case B_INT4:          /* int4, oid, date: as int4send; float4: its bits, as float4send */
        pq_writeint8(out, 'b');
        pq_writeint32(out, 4);
        pq_writeint32(out, DatumGetUInt32(v[k]));
        break;
      case B_INT8:          /* int8, time, timestamp(tz): as int8send; float8: its bits */
        pq_writeint8(out, 'b');
        pq_writeint32(out, 8);
        pq_writeint64(out, (uint64)DatumGetInt64(v[k]));
        break;
      case B_UUID:
        send_bytes(out, 'b', DatumGetPointer(v[k]), 16, after);
        break;
      case B_INTERVAL: {  /* as interval_send: time, day, month */
        Interval *iv = DatumGetIntervalP(v[k]);
        pq_writeint8(out, 'b');
        pq_writeint32(out, 16);
        pq_writeint64(out, (uint64)iv->time);
        pq_writeint32(out, (uint32)iv->day);
        pq_writeint32(out, (uint32)iv->month);
        break;
      }
      case B_NAME:
        s = NameStr(*DatumGetName(v[k]));
        send_bytes(out, 'b', s, strlen(s), after);
        break;
      case B_BYTES: {
        /* text-like and bytea: the bytes (textsend and byteasend send them as they are
         * when the client's encoding is the database's) */
        struct varlena *p = pg_detoast_datum_packed((struct varlena *)DatumGetPointer(v[k]));
        send_bytes(out, 'b', VARDATA_ANY(p), VARSIZE_ANY_EXHDR(p), after);
        break;
      }
      case B_NUMERIC:
        if (send_numeric(out, v[k], after)) break;
        /* FALLTHROUGH */
      default: {
        bytea *b = SendFunctionCall(&e->out[i], v[k]);
        send_bytes(out, 'b', VARDATA(b), VARSIZE(b) - VARHDRSZ, after);
        break;
      }
    }
  }
}

/* --- conditions ----------------------------------------------------------------------- */

/* Whether the row (v, isnull) meets every condition. A value that cannot be tested here
 * (an unchanged TOASTed value absent from the WAL) is no match, and counted. */
static bool row_matches(FlashData *d, RelListener *rl, Datum *v, bool *isnull) {
  for (int i = 0; i < rl->ncond; i++) {
    Cond *c = &rl->conds[i];
    int k = c->att - 1;
    bool hit = false;
    if (c->op == C_ISNULL) { if (!isnull[k]) return false; continue; }
    if (c->op == C_NOTNULL) { if (isnull[k]) return false; continue; }
    if (isnull[k]) return false;
    if (is_ondisk(c->typlen, v[k])) { d->nomatch++; return false; }
    for (int j = 0; j < c->nvals && !hit; j++) {
      int32 r = DatumGetInt32(FunctionCall2Coll(&c->cmp, c->coll, v[k], c->vals[j]));
      switch (c->op) {
        case C_EQ: case C_IN: hit = r == 0; break;
        case C_NE: hit = r != 0; break;
        case C_LT: hit = r < 0; break;
        case C_LE: hit = r <= 0; break;
        case C_GT: hit = r > 0; break;
        case C_GE: hit = r >= 0; break;
      }
    }
    if (!hit) return false;
  }
  return true;
}

static bool same_value(Form_pg_attribute a, Datum x, bool xn, Datum y, bool yn) {
  if (xn || yn) return xn == yn;
  if (is_ondisk(a->attlen, x) || is_ondisk(a->attlen, y)) return true;   /* unchanged TOAST */
  return datumIsEqual(x, y, a->attbyval, a->attlen);
}

/* Whether rel is the registry (found by name while the cache has not read it yet, or the
 * extension did not exist when it did). */
static bool is_registry(FlashData *d, Relation rel) {
  char *nsp;
  if (d->loaded && OidIsValid(d->registry)) return RelationGetRelid(rel) == d->registry;
  if (strcmp(RelationGetRelationName(rel), FLASH_REGISTRY) != 0) return false;
  nsp = get_namespace_name(RelationGetNamespace(rel));
  return nsp && strcmp(nsp, FLASH_SCHEMA) == 0;
}

/* Outcomes of one change for a listener, in the order their frames go out. */
enum { G_UPDATE, G_INSERT, G_DELETE, G_SPLIT, G_N };
StaticAssertDecl(G_N == lengthof(((RelEntry *)NULL)->ids), "an ids list per outcome");

static void change_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, Relation rel, ReorderBufferChange *change) {
  FlashData *d = ctx->output_plugin_private;
  RelEntry *e;
  TupleDesc desc = RelationGetDescr(rel);
  HeapTuple newt = NULL, oldt = NULL;
  Datum *nv = NULL, *ov = NULL;
  bool *nn = NULL, *on = NULL;
  bool full, partial = false;
  int64 *const *ids;
  int nids[G_N] = { 0 };
  int *cand, ncand;
  MemoryContext old;

  if (is_registry(d, rel)) {
    /* A listen or unlisten: the following changes see the registry as it now is. A listen
     * of this consumer is marked in the stream where it happened ('A', listener id): its
     * listener gets every change after this one in the transaction, and every later one. */
    if (change->action == REORDER_BUFFER_CHANGE_INSERT && change->data.tp.newtuple &&
        RelationGetDescr(rel)->natts == R_NATTS) {
      Datum v[R_NATTS];
      bool n[R_NATTS];
      heap_deform_tuple(&change->data.tp.newtuple->tuple, RelationGetDescr(rel), v, n);
      if (!n[R_ID] && !n[R_CONSUMER] && strcmp(TextDatumGetCString(v[R_CONSUMER]), d->consumer) == 0) {
        send_begin(ctx, txn);
        message_begin(ctx, change->lsn, 'A', 8);
        pq_sendint64(ctx->out, DatumGetInt64(v[R_ID]));
        OutputPluginWrite(ctx, false);
      }
    }
    reset_cache(d);
    return;
  }
  e = !d->stale && d->last && d->last->valid && d->last->relid == RelationGetRelid(rel) && d->last->natts == desc->natts
        ? d->last : get_entry(d, rel);
  if (!e->warned) send_warnings(ctx, txn, change->lsn, e);
  if (e->n == 0) {
    if (++d->skipped % 1000 == 0) OutputPluginUpdateProgress(ctx, false);
    return;
  }
  old = MemoryContextSwitchTo(d->changecxt);
  /* nv, ov: e->natts values (get_entry rebuilt the entry for another descriptor). Of an
   * insert only the few columns its tests read are fetched first, so that a row no listener
   * wants costs that much; it is deformed whole once it is sent. */
  if (change->data.tp.newtuple) {
    newt = &change->data.tp.newtuple->tuple;
    nv = e->nv;
    nn = e->nn;
    if (change->action == REORDER_BUFFER_CHANGE_INSERT && e->ntest >= 0) {
      for (int i = 0; i < e->ntest; i++) {
        int k = e->test[i] - 1;
        nv[k] = heap_getattr(newt, k + 1, desc, &nn[k]);
      }
      partial = true;
    } else {
      heap_deform_tuple(newt, desc, nv, nn);
    }
  }
  if (change->data.tp.oldtuple) {
    oldt = &change->data.tp.oldtuple->tuple;
    ov = e->ov;
    on = e->on;
    heap_deform_tuple(oldt, desc, ov, on);
  }
  full = oldt && rel->rd_rel->relreplident == REPLICA_IDENTITY_FULL;
  if (full && nv)
    /* An unchanged TOASTed value is absent from the new row but whole in the old one
     * (REPLICA IDENTITY FULL): it is the same value, so conditions test it and the new row
     * carries it. */
    for (int k = 0; k < desc->natts; k++) {
      int16 len = TupleDescAttr(desc, k)->attlen;
      if (!nn[k] && !on[k] && is_ondisk(len, nv[k]) && !is_ondisk(len, ov[k])) nv[k] = ov[k];
    }
  ids = e->ids;

  cand = candidates(e, change->action, full, nv, nn, ov, on, &ncand);
  for (int ci = 0; ci < ncand; ci++) {
    RelListener *rl = &e->ls[cand[ci]];
    int ops = rl->l->ops;
    if (rl->broken) continue;
    switch (change->action) {
      case REORDER_BUFFER_CHANGE_INSERT:
        if ((ops & OP_INSERT) && nv && row_matches(d, rl, nv, nn)) ids[G_INSERT][nids[G_INSERT]++] = rl->l->id;
        break;
      case REORDER_BUFFER_CHANGE_DELETE:
        /* Without the whole old row (REPLICA IDENTITY FULL) conditions cannot be tested. */
        if ((ops & OP_DELETE) && (!full || row_matches(d, rl, ov, on))) ids[G_DELETE][nids[G_DELETE]++] = rl->l->id;
        break;
      case REORDER_BUFFER_CHANGE_UPDATE: {
        bool n, o, moved = false;
        if (!nv) break;
        n = row_matches(d, rl, nv, nn);
        o = full ? row_matches(d, rl, ov, on) : n;
        if (o && n) {
          if (full)
            for (int k = 0; k < rl->npk && !moved; k++) {
              int a = rl->pk[k] - 1;
              if (a < 0) continue;
              moved = !same_value(TupleDescAttr(desc, a), ov[a], on[a], nv[a], nn[a]);
            }
          if (moved) {
            if (ops & (OP_INSERT | OP_DELETE)) ids[G_SPLIT][nids[G_SPLIT]++] = rl->l->id;
          } else if (ops & OP_UPDATE) {
            bool changed = !(full && rl->cols);
            for (int k = 0; !changed && k < rl->ncols; k++) {
              int a = rl->cols[k] - 1;
              if (a < 0) continue;
              changed = !same_value(TupleDescAttr(desc, a), ov[a], on[a], nv[a], nn[a]);
            }
            if (changed) ids[G_UPDATE][nids[G_UPDATE]++] = rl->l->id;
          }
        } else if (o && (ops & OP_DELETE)) {
          ids[G_DELETE][nids[G_DELETE]++] = rl->l->id;
        } else if (n && !o && (ops & OP_INSERT)) {
          ids[G_INSERT][nids[G_INSERT]++] = rl->l->id;
        }
        break;
      }
      default:
        break;
    }
  }

  if (nids[G_UPDATE] + nids[G_INSERT] + nids[G_DELETE] + nids[G_SPLIT] > 0) {
    if (partial) heap_deform_tuple(newt, desc, nv, nn);
    send_begin(ctx, txn);
    if (!e->rel_sent) send_relation(ctx, rel, e);
    for (int g = 0; g < G_N; g++) {
      int action = change->action;
      if (nids[g] == 0) continue;
      /* A split is a delete then an insert, to listeners that want each. */
      for (int part = 0; part < (g == G_SPLIT ? 2 : 1); part++) {
        char kind = g == G_UPDATE ? 'U' : g == G_INSERT ? 'I' : g == G_DELETE ? 'D' : part == 0 ? 'D' : 'I';
        int want = kind == 'I' ? OP_INSERT : kind == 'D' ? OP_DELETE : OP_UPDATE;
        int64 *list = ids[g];
        int n = nids[g];
        if (g == G_SPLIT) {
          int m = 0;
          list = palloc(sizeof(int64) * n);
          for (int i = 0; i < e->n; i++)
            for (int j = 0; j < nids[g]; j++)
              if (e->ls[i].l->id == ids[g][j] && (e->ls[i].l->ops & want)) list[m++] = ids[g][j];
          n = m;
          if (n == 0) continue;
        }
        send_tag(ctx, change->lsn, list, n);
        frame_start(ctx, kind, change->txn->xid);
        pq_sendint32(ctx->out, RelationGetRelid(rel));
        if (kind == 'U' || kind == 'D') {
          /* An insert made of an update carries the new row, a delete made of one the old. */
          if (oldt && (kind == 'D' || full)) {
            pq_sendbyte(ctx->out, full ? 'O' : 'K');
            send_tuple(ctx->out, desc, e, ov, on);
          } else if (kind == 'D') {
            /* A delete whose old row the WAL lacks (REPLICA IDENTITY NOTHING): the key
             * columns of the new row cannot stand in, so every value is NULL. */
            pq_sendbyte(ctx->out, 'K');
            pq_sendint16(ctx->out, e->nsend);
            for (int k = 0; k < e->nsend; k++) pq_sendbyte(ctx->out, 'n');
          }
        }
        if (kind == 'U' || kind == 'I') {
          pq_sendbyte(ctx->out, 'N');
          send_tuple(ctx->out, desc, e, nv ? nv : ov, nv ? nn : on);
        }
        OutputPluginWrite(ctx, false);
        (void)action;
      }
    }
  } else if (++d->skipped % 1000 == 0) {
    OutputPluginUpdateProgress(ctx, false);
  }
  MemoryContextSwitchTo(old);
  if (!d->changecxt->isReset || d->changecxt->firstchild) MemoryContextReset(d->changecxt);
}

static void truncate_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, int nrelations, Relation relations[],
                        ReorderBufferChange *change) {
  FlashData *d = ctx->output_plugin_private;
  MemoryContext old = MemoryContextSwitchTo(d->changecxt);
  for (int r = 0; r < nrelations; r++) {
    RelEntry *e;
    int64 *ids;
    int n = 0;
    /* A partitioned table holds no rows: as pgoutput does, a TRUNCATE is sent for each
     * table it emptied (its partitions), not for the partitioned tables above them. */
    if (relations[r]->rd_rel->relkind == RELKIND_PARTITIONED_TABLE) continue;
    e = get_entry(d, relations[r]);
    ids = palloc(sizeof(int64) * (e->n + 1));
    if (!e->warned) send_warnings(ctx, txn, change->lsn, e);
    for (int i = 0; i < e->n; i++)
      if (!e->ls[i].broken && (e->ls[i].l->ops & OP_TRUNCATE)) ids[n++] = e->ls[i].l->id;
    if (n == 0) continue;
    send_begin(ctx, txn);
    if (!e->rel_sent) send_relation(ctx, relations[r], e);
    send_tag(ctx, change->lsn, ids, n);
    frame_start(ctx, 'T', change->txn->xid);
    pq_sendint32(ctx->out, 1);
    pq_sendbyte(ctx->out, (change->data.truncate.cascade ? 1 : 0) | (change->data.truncate.restart_seqs ? 2 : 0));
    pq_sendint32(ctx->out, RelationGetRelid(relations[r]));
    OutputPluginWrite(ctx, false);
  }
  MemoryContextSwitchTo(old);
  MemoryContextReset(d->changecxt);
}

static void begin_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn) {
  FlashData *d = ctx->output_plugin_private;
  d->begun = false;
  d->last_n = -1;
}

/* 'N', int64: how many tests of this transaction could not be made (counted as no match). */
static void send_nomatch(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr lsn) {
  FlashData *d = ctx->output_plugin_private;
  if (d->nomatch == d->nomatch_sent) return;
  send_begin(ctx, txn);
  message_begin(ctx, lsn, 'N', 8);
  pq_sendint64(ctx->out, (int64)(d->nomatch - d->nomatch_sent));
  OutputPluginWrite(ctx, false);
  d->nomatch_sent = d->nomatch;
}

static void commit_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr commit_lsn) {
  FlashData *d = ctx->output_plugin_private;
  send_nomatch(ctx, txn, commit_lsn);
  if (!d->begun) {
    /* Nothing of it was for us: let the walsender confirm past it. */
    OutputPluginUpdateProgress(ctx, true);
    return;
  }
  OutputPluginPrepareWrite(ctx, true);
  pq_sendbyte(ctx->out, 'C');
  pq_sendbyte(ctx->out, 0);
  pq_sendint64(ctx->out, commit_lsn);
  pq_sendint64(ctx->out, txn->end_lsn);
  pq_sendint64(ctx->out, txn->xact_time.commit_time);
  OutputPluginWrite(ctx, true);
  d->begun = false;
}

/* --- streaming of large in-progress transactions (pgoutput protocol 2's frames) ----------
 * Past logical_decoding_work_mem the walsender hands a transaction's changes over in
 * blocks before it ends: each block's frames are those of change_cb and truncate_cb
 * between a Stream Start ('S', xid, first block) and a Stream Stop ('E'), then a Stream
 * Commit ('c') or Stream Abort ('A', xid, subtransaction xid). The client keeps them
 * until the commit and delivers the transaction once, whole and in order, and nothing of
 * an aborted one. A block with nothing for the consumer sends nothing, nor does the end of
 * a transaction no block of which was sent. */

static void stream_start_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn) {
  FlashData *d = ctx->output_plugin_private;
  d->in_stream = true;
  d->stream_opened = false;
  d->stream_xid = txn->xid;
  /* A tag holds within a block: the first change of one sends it. Forgotten here, before
   * the block's first send_tag compares with it (not when the block's first frame opens it,
   * which comes after that comparison): the tag of the transaction sent before this block
   * is no tag of this one, and the client starts every transaction without one. */
  d->last_n = -1;
}

static void stream_stop_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn) {
  FlashData *d = ctx->output_plugin_private;
  if (d->stream_opened) {
    OutputPluginPrepareWrite(ctx, true);
    pq_sendbyte(ctx->out, 'E');
    OutputPluginWrite(ctx, true);
  }
  d->in_stream = false;
  d->stream_opened = false;
}

static void stream_abort_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr abort_lsn) {
  FlashData *d = ctx->output_plugin_private;
  ReorderBufferTXN *top = txn->toptxn ? txn->toptxn : txn;
  if (!list_member_oid(d->streamed, top->xid)) return;
  OutputPluginPrepareWrite(ctx, true);
  pq_sendbyte(ctx->out, 'A');
  pq_sendint32(ctx->out, top->xid);
  pq_sendint32(ctx->out, txn->xid);
  OutputPluginWrite(ctx, true);
  if (top == txn) {
    HASH_SEQ_STATUS st;
    RelEntry *e;
    d->streamed = list_delete_oid(d->streamed, top->xid);
    /* Relation and 'W' messages of its blocks are dropped with it: send them again. */
    hash_seq_init(&st, d->rels);
    while ((e = hash_seq_search(&st)) != NULL) e->rel_sent = e->warned = false;
  }
}

static void stream_commit_cb(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr commit_lsn) {
  FlashData *d = ctx->output_plugin_private;
  send_nomatch(ctx, txn, commit_lsn);
  d->begun = false;
  if (!list_member_oid(d->streamed, txn->xid)) {
    OutputPluginUpdateProgress(ctx, true);
    return;
  }
  d->streamed = list_delete_oid(d->streamed, txn->xid);
  OutputPluginPrepareWrite(ctx, true);
  pq_sendbyte(ctx->out, 'c');
  pq_sendint32(ctx->out, txn->xid);
  pq_sendbyte(ctx->out, 0);
  pq_sendint64(ctx->out, commit_lsn);
  pq_sendint64(ctx->out, txn->end_lsn);
  pq_sendint64(ctx->out, txn->xact_time.commit_time);
  OutputPluginWrite(ctx, true);
}

/* --- frames held until the last of a transaction -------------------------------------
 * The walsender's write callback sends every frame with its own send() (it flushes the
 * output buffer after each message): a third of its CPU per row at 100 rows a transaction.
 * A frame that is not the last of its transaction or streamed block is only put into the
 * connection's output buffer, with the XLogData header the walsender's write would give it
 * (the same bytes on the wire), and goes out with the next last frame (Commit, Stream Stop,
 * ...) or once HOLD_BYTES are held, through the walsender's own write, which flushes them
 * all and runs its checks (timeouts, keepalives, a client that does not read); at the
 * latest, its main loop flushes the buffer after the WAL record whose decoding wrote them.
 * Every other message of the walsender (keepalives) goes through the same buffer, after
 * them: frames are delayed, never reordered. */
#define HOLD_BYTES 65536
#define XLOGDATA_HEADER (1 + 3 * (int)sizeof(int64))     /* 'w', start, end, send time */

static void held_write(LogicalDecodingContext *ctx, XLogRecPtr lsn, TransactionId xid, bool last_write) {
  FlashData *d = ctx->output_plugin_private;
  StringInfo out = ctx->out;
  /* 'w': the walsender's framing (the SQL functions' frames start with their own type). */
  if (!last_write && out->len > XLOGDATA_HEADER && out->data[0] == 'w' && d->held + out->len < HOLD_BYTES) {
    uint64 t;
    if (d->held == 0) d->held_at = GetCurrentTimestamp();
    t = pg_hton64((uint64)d->held_at);
    memcpy(&out->data[1 + 2 * sizeof(int64)], &t, sizeof t);
    pq_putmessage_noblock('d', out->data, out->len);
    d->held += out->len;
    CHECK_FOR_INTERRUPTS();
    return;
  }
  d->held = 0;
  d->send_write(ctx, lsn, xid, last_write);
}

static bool option_on(const char *val) {
  return strcmp(val, "on") == 0 || strcmp(val, "1") == 0 || strcmp(val, "true") == 0;
}

static void startup_cb(LogicalDecodingContext *ctx, OutputPluginOptions *opt, bool is_init) {
  FlashData *d = palloc0(sizeof *d);
  ListCell *lc;
  static bool registered = false;
  d->cachecxt = AllocSetContextCreate(ctx->context, "flashlua cache", ALLOCSET_DEFAULT_SIZES);
  d->changecxt = AllocSetContextCreate(ctx->context, "flashlua change", ALLOCSET_DEFAULT_SIZES);
  ctx->output_plugin_private = d;
  opt->output_type = OUTPUT_PLUGIN_BINARY_OUTPUT;
  opt->receive_rewrites = false;
  foreach (lc, ctx->output_plugin_options) {
    DefElem *el = lfirst(lc);
    char *val = el->arg ? strVal(el->arg) : NULL;
    if (strcmp(el->defname, "consumer") == 0 && val && *val) {
      d->consumer = pstrdup(val);
    } else if (strcmp(el->defname, "streaming") == 0 && val) {
      d->streaming = option_on(val);
    } else if (strcmp(el->defname, "binary") == 0 && val) {
      d->binary = option_on(val);
    } else if (strcmp(el->defname, "sticky_tags") == 0 && val) {
      d->sticky = option_on(val);
    } else if (strcmp(el->defname, "version") == 0 && val) {
      if (strcmp(val, FLASH_VERSION) != 0)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("the client expects flashlua %s, the server's output plugin is %s", val, FLASH_VERSION),
                        errhint("install the matching version on the server (make install-pgext) and run "
                                "ALTER EXTENSION flashlua UPDATE")));
    } else {
      ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                      errmsg("flashlua output plugin: unknown option \"%s\" (it takes consumer 'name', version '%s', "
                             "sticky_tags 'on', binary 'on' and streaming 'on')",
                             el->defname, FLASH_VERSION)));
    }
  }
  if (!is_init && !d->consumer)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("flashlua output plugin: the option consumer 'name' is required")));
  if (!d->consumer) d->consumer = pstrdup("");
  /* Streaming only for a client that asked for it (it must read protocol 2's frames). */
  ctx->streaming = ctx->streaming && d->streaming;
  reset_cache(d);
  if (am_walsender) {
    d->send_write = ctx->write;
    ctx->write = held_write;
  }
  active_data = d;
  if (!registered) {
    CacheRegisterRelcacheCallback(rel_inval, (Datum)0);
    registered = true;
  }
}

static void shutdown_cb(LogicalDecodingContext *ctx) {
  if (active_data == ctx->output_plugin_private) active_data = NULL;
}

void _PG_output_plugin_init(OutputPluginCallbacks *cb) {
  cb->startup_cb = startup_cb;
  cb->begin_cb = begin_cb;
  cb->change_cb = change_cb;
  cb->truncate_cb = truncate_cb;
  cb->commit_cb = commit_cb;
  cb->shutdown_cb = shutdown_cb;
  cb->stream_start_cb = stream_start_cb;
  cb->stream_stop_cb = stream_stop_cb;
  cb->stream_abort_cb = stream_abort_cb;
  cb->stream_commit_cb = stream_commit_cb;
  cb->stream_change_cb = change_cb;
  cb->stream_truncate_cb = truncate_cb;
}
