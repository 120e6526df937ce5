/* flash.capture(): the trigger drivers' row capture in C (docs/drivers.md "The C capture
 * function"). The same row as the PL/pgSQL capture() appends to an instance's events
 * table — the row's text as record_out prints it under canonical output settings, the
 * operation, the relation, the listener's tag — but without PL/pgSQL, SPI or the executor:
 * one heap_insert and one index_insert per captured row.
 *
 * Arguments (CREATE TRIGGER ... EXECUTE FUNCTION flash.capture(tag, events, max_row)):
 *   tag      the trigger's route: minus the id of a row of the instance's routes table
 *            (capture.lua, Driver:route_tag), which says which listened tables it captures for
 *   events   the oid of the instance's events table
 *   max_row  a row whose text is longer is captured without values (big = its size)
 *
 * Security: the function is not SECURITY DEFINER — everything it runs (the output
 * functions of the row's types) runs with the writer's own rights, and nothing runs with
 * flashlua's. It writes to the events table without the writer holding any privilege on
 * it, so it writes nothing into a target that is not a flashlua events table: exactly
 * the expected columns, one btree index on seq, in a schema marked "flashlua instance".
 * EXECUTE is revoked from PUBLIC (creating a trigger needs it; firing one does not).
 *
 * A missing or wrong target is skipped, never an error: no user write fails because a
 * flashlua schema was dropped by hand under its triggers. */
#include "postgres.h"

#include "access/detoast.h"
#include "access/genam.h"
#include "access/heapam.h"
#include "access/heaptoast.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/pg_am.h"
#include "catalog/pg_description.h"
#include "catalog/pg_namespace.h"
#include "catalog/dependency.h"
#include "catalog/pg_type.h"
#include "commands/comment.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/execnodes.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/bytea.h"
#include "utils/datetime.h"
#include "utils/fmgroids.h"
#include "utils/float.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

/* The events table's columns (lua/flash/driver/capture.lua, schema_sql). */
enum { EV_SEQ, EV_XID, EV_OP, EV_REL, EV_TAG, EV_NEW, EV_OLD, EV_BIG, EV_NATTS };
static const struct { const char *name; Oid type; } ev_columns[EV_NATTS] = {
  { "seq", INT8OID }, { "xid", INT8OID }, { "op", CHAROID }, { "rel", OIDOID },
  { "tag", INT4OID }, { "new", TEXTOID }, { "old", TEXTOID }, { "big", INT8OID },
};

/* A row stored in more than this is printed under a subtransaction that catches what
 * PostgreSQL cannot do (a text over 1 GB, out of memory): capture.lua's GUARDED. */
#define GUARDED (256 * 1024)

/* A checked events table: its seq sequence and index. Dropped on any invalidation of it. */
typedef struct Target {
  Oid relid;        /* hash key */
  bool valid;       /* a flashlua events table (else captures into it are skipped) */
  Oid seqid;
  Oid indexid;
} Target;

/* Per source relation: record_out's FmgrInfo, whose fn_extra caches the column I/O. */
typedef struct Source {
  Oid relid;        /* hash key */
  FmgrInfo out;
} Source;

static HTAB *targets;
static HTAB *sources;
static pg_tz *utc;

PG_FUNCTION_INFO_V1(flash_capture);

static void
forget_target(Datum arg, Oid relid)
{
  if (!targets)
    return;
  if (relid == InvalidOid) {
    HASH_SEQ_STATUS s;
    Target *t;
    hash_seq_init(&s, targets);
    while ((t = hash_seq_search(&s)) != NULL)
      hash_search(targets, &t->relid, HASH_REMOVE, NULL);
  } else
    hash_search(targets, &relid, HASH_REMOVE, NULL);
}

static void
init_caches(void)
{
  HASHCTL ctl;
  if (targets)
    return;
  memset(&ctl, 0, sizeof ctl);
  ctl.keysize = sizeof(Oid);
  ctl.entrysize = sizeof(Target);
  targets = hash_create("flash.capture targets", 16, &ctl, HASH_ELEM | HASH_BLOBS);
  ctl.entrysize = sizeof(Source);
  ctl.hcxt = TopMemoryContext;
  sources = hash_create("flash.capture sources", 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
  CacheRegisterRelcacheCallback(forget_target, (Datum) 0);
  utc = pg_tzset("UTC");
  if (!utc)
    elog(ERROR, "flash.capture: cannot load time zone UTC");
}

/* Is `rel` a flashlua events table? Its columns, its one index, its schema's mark. */
static bool
check_target(Relation rel, Target *t)
{
  TupleDesc d = RelationGetDescr(rel);
  List *indexes;
  char *comment;
  int i;

  if (rel->rd_rel->relkind != RELKIND_RELATION || d->natts != EV_NATTS)
    goto bad;
  for (i = 0; i < EV_NATTS; i++) {
    Form_pg_attribute a = TupleDescAttr(d, i);
    if (a->attisdropped || a->atttypid != ev_columns[i].type || strcmp(NameStr(a->attname), ev_columns[i].name) != 0)
      goto bad;
  }
  comment = GetComment(rel->rd_rel->relnamespace, NamespaceRelationId, 0);
  if (!comment || strncmp(comment, "flashlua instance", 17) != 0)
    goto bad;
  t->seqid = getIdentitySequence(RelationGetRelid(rel), EV_SEQ + 1, true);
  if (!OidIsValid(t->seqid))
    goto bad;
  indexes = RelationGetIndexList(rel);
  if (list_length(indexes) != 1)
    goto bad;
  t->indexid = linitial_oid(indexes);
  {
    Relation ix = index_open(t->indexid, AccessShareLock);
    bool ok = ix->rd_rel->relam == BTREE_AM_OID && ix->rd_index->indnatts == 1 &&
              ix->rd_index->indkey.values[0] == EV_SEQ + 1 && ix->rd_indexprs == NIL && ix->rd_indpred == NIL;
    index_close(ix, AccessShareLock);
    if (!ok)
      goto bad;
  }
  return true;
bad:
  return false;
}

/* The canonical output settings (capture.lua's FUNC_SETTINGS), set as the variables the
 * output functions read, for the length of one record_out. */
typedef struct Settings {
  int date_style, date_order, interval_style, bytea_out, float_digits;
  pg_tz *tz;
} Settings;

static void
settings_swap(Settings *save)
{
  save->date_style = DateStyle;
  save->date_order = DateOrder;
  save->interval_style = IntervalStyle;
  save->bytea_out = bytea_output;
  save->float_digits = extra_float_digits;
  save->tz = session_timezone;
  DateStyle = USE_ISO_DATES;
  DateOrder = DATEORDER_MDY;
  IntervalStyle = INTSTYLE_POSTGRES;
  bytea_output = BYTEA_OUTPUT_HEX;
  extra_float_digits = 3;
  session_timezone = utc;
}

static void
settings_restore(const Settings *save)
{
  DateStyle = save->date_style;
  DateOrder = save->date_order;
  IntervalStyle = save->interval_style;
  bytea_output = save->bytea_out;
  extra_float_digits = save->float_digits;
  session_timezone = save->tz;
}

/* The row's size as stored: what pg_column_size() says of it (externals at their size). */
static int64
stored_size(HeapTuple tuple, TupleDesc d)
{
  int64 n = tuple->t_len;
  int i;
  if (!HeapTupleHasExternal(tuple))
    return n;
  for (i = 0; i < d->natts; i++) {
    Form_pg_attribute a = TupleDescAttr(d, i);
    bool isnull;
    Datum v;
    if (a->attisdropped || a->attlen != -1)
      continue;
    v = heap_getattr(tuple, i + 1, d, &isnull);
    if (!isnull && VARATT_IS_EXTERNAL(DatumGetPointer(v)))
      n += toast_datum_size(v);
  }
  return n;
}

static char *
row_out(FmgrInfo *out, HeapTuple tuple, TupleDesc d)
{
  Settings save;
  char *s;
  Datum rec = heap_copy_tuple_as_datum(tuple, d);
  settings_swap(&save);
  PG_TRY();
  {
    s = OutputFunctionCall(out, rec);
  }
  PG_FINALLY();
  {
    settings_restore(&save);
  }
  PG_END_TRY();
  return s;
}

/* A large row's text, or NULL when PostgreSQL cannot make it: as capture.lua's row_text(),
 * under a subtransaction, so the failure costs the writer nothing but this row's values. */
static char *
row_out_guarded(FmgrInfo *out, HeapTuple tuple, TupleDesc d)
{
  MemoryContext cx = CurrentMemoryContext;
  ResourceOwner owner = CurrentResourceOwner;
  char *volatile s = NULL;

  BeginInternalSubTransaction(NULL);
  MemoryContextSwitchTo(cx);
  PG_TRY();
  {
    s = row_out(out, tuple, d);
    ReleaseCurrentSubTransaction();
    MemoryContextSwitchTo(cx);
    CurrentResourceOwner = owner;
  }
  PG_CATCH();
  {
    MemoryContextSwitchTo(cx);
    FlushErrorState();
    RollbackAndReleaseCurrentSubTransaction();
    MemoryContextSwitchTo(cx);
    CurrentResourceOwner = owner;
    s = NULL;
  }
  PG_END_TRY();
  return s;
}

/* One side of the change (NEW or OLD) as text; NULL and *big set when it has no values. */
static Datum
side(Source *src, HeapTuple tuple, TupleDesc d, int64 max_row, bool *isnull, int64 *big)
{
  int64 stored = stored_size(tuple, d);
  char *s = stored <= GUARDED ? row_out(&src->out, tuple, d) : row_out_guarded(&src->out, tuple, d);
  int64 len;

  if (!s) {                          /* no text at all: minus its stored size */
    *big = Min(*big, -stored);
    *isnull = true;
    return (Datum) 0;
  }
  len = strlen(s);
  if (len > max_row) {
    *big = Max(*big, len);
    pfree(s);
    *isnull = true;
    return (Datum) 0;
  }
  *isnull = false;
  return PointerGetDatum(cstring_to_text_with_len(s, len));
}

Datum
flash_capture(PG_FUNCTION_ARGS)
{
  TriggerData *td = (TriggerData *) fcinfo->context;
  Trigger *tg;
  Oid evid, srcid;
  int32 tag;
  int64 max_row;
  Relation ev, ix;
  Target *t, target;
  Source *src = NULL;
  bool found;
  Datum values[EV_NATTS];
  bool nulls[EV_NATTS];
  HeapTuple row;
  char op;
  int64 big = 0;
  HeapTuple newt = NULL, oldt = NULL;

  if (!CALLED_AS_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("flash.capture() is a trigger function")));
  if (!TRIGGER_FIRED_AFTER(td->tg_event))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("flash.capture() must be an AFTER trigger")));
  tg = td->tg_trigger;
  if (tg->tgnargs != 3)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("flash.capture() takes (tag, events table oid, max row bytes)")));
  tag = pg_strtoint32(tg->tgargs[0]);
  evid = (Oid) strtoul(tg->tgargs[1], NULL, 10);
  max_row = pg_strtoint64(tg->tgargs[2]);
  srcid = RelationGetRelid(td->tg_relation);

  if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
    op = 'T';
  else if (!TRIGGER_FIRED_FOR_ROW(td->tg_event))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("flash.capture() is a row trigger (or a TRUNCATE statement trigger)")));
  else if (TRIGGER_FIRED_BY_INSERT(td->tg_event)) {
    op = 'I';
    newt = td->tg_trigtuple;
  } else if (TRIGGER_FIRED_BY_UPDATE(td->tg_event)) {
    op = 'U';
    oldt = td->tg_trigtuple;
    newt = td->tg_newtuple;
  } else {
    op = 'D';
    oldt = td->tg_trigtuple;
  }

  init_caches();
  /* A trigger whose events table is gone (its schema dropped by hand) or is not one
   * captures nothing: a user's write never fails because of it. flashlua's next start
   * drops such triggers. */
  ev = try_table_open(evid, RowExclusiveLock);
  if (!ev)
    return PointerGetDatum(NULL);
  /* Copied out: opening a relation can process invalidations that empty the cache. */
  t = hash_search(targets, &evid, HASH_FIND, NULL);
  if (t)
    target = *t;
  else {
    target.valid = check_target(ev, &target);
    target.relid = evid;
    *(Target *) hash_search(targets, &evid, HASH_ENTER, NULL) = target;
  }
  if (!target.valid) {
    table_close(ev, RowExclusiveLock);
    return PointerGetDatum(NULL);
  }
  if (newt || oldt) {
    src = hash_search(sources, &srcid, HASH_ENTER, &found);
    if (!found)
      fmgr_info_cxt(F_RECORD_OUT, &src->out, TopMemoryContext);
  }

  memset(nulls, 0, sizeof nulls);
  values[EV_SEQ] = Int64GetDatum(nextval_internal(target.seqid, false));
  values[EV_XID] = Int64GetDatum((int64) U64FromFullTransactionId(GetTopFullTransactionId()));
  values[EV_OP] = CharGetDatum(op);
  values[EV_REL] = ObjectIdGetDatum(srcid);
  values[EV_TAG] = Int32GetDatum(tag);
  if (newt)
    values[EV_NEW] = side(src, newt, RelationGetDescr(td->tg_relation), max_row, &nulls[EV_NEW], &big);
  else
    nulls[EV_NEW] = true;
  if (oldt)
    values[EV_OLD] = side(src, oldt, RelationGetDescr(td->tg_relation), max_row, &nulls[EV_OLD], &big);
  else
    nulls[EV_OLD] = true;
  values[EV_BIG] = Int64GetDatum(big);
  nulls[EV_BIG] = big == 0;

  row = heap_form_tuple(RelationGetDescr(ev), values, nulls);
  heap_insert(ev, row, GetCurrentCommandId(true), 0, NULL);
  ix = index_open(target.indexid, RowExclusiveLock);
  {
    Datum key = values[EV_SEQ];
    bool keynull = false;
    index_insert(ix, &key, &keynull, &row->t_self, ev, UNIQUE_CHECK_NO, false, BuildIndexInfo(ix));
  }
  index_close(ix, RowExclusiveLock);
  table_close(ev, RowExclusiveLock);
  heap_freetuple(row);
  return PointerGetDatum(NULL);
}
