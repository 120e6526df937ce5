/* fl_pqconn: what every flashlua connection (query, replication, backfill) does right
 * after libpq connected it, whatever layer opened it. */
#ifndef FL_PQCONN_H
#define FL_PQCONN_H
#include <libpq-fe.h>

/* Connections ask for client_encoding UTF8, so the server converts text from the
 * database's encoding (LATIN1, EUC_JP, ...) to UTF-8. A SQL_ASCII database has no
 * encoding to convert from: its text is whatever bytes writers stored, and the server
 * refuses to send a byte >= 0x80 that is not valid UTF-8 to a UTF8 client (failing the
 * query, or the walsender). On such a database the connection asks for SQL_ASCII too, so
 * no conversion happens and values arrive as the stored bytes. Returns 0, or -1 when the
 * setting failed (PQerrorMessage(pg) says why). */
int fl_pq_raw_encoding(PGconn *pg);

#endif
