/* fl_pqconn: see fl_pqconn.h. */
#include <string.h>
#include "fl_pqconn.h"

int fl_pq_raw_encoding(PGconn *pg) {
  const char *enc = PQparameterStatus(pg, "server_encoding");
  if (enc == NULL || strcmp(enc, "SQL_ASCII") != 0) return 0;
  return PQsetClientEncoding(pg, "SQL_ASCII") == 0 ? 0 : -1;
}
