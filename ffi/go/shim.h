/*
 * C-side helpers for the Go package. cgo forbids Go code from storing Go pointers in memory
 * passed to C (a tally_request holding pointers to Go strings is such memory), so Go passes
 * each string as a (pointer, length) argument and these helpers assemble the tally_request
 * on the C stack (or, for a batch, in C memory) for the duration of the call. The library
 * never keeps the pointers, as the header promises.
 */
#ifndef TALLY_GO_SHIM_H
#define TALLY_GO_SHIM_H

#include <stdlib.h>
#include "tally.h"

/* Returned by tally_go_consume_many when malloc fails (not a tally_status). */
#define TALLY_GO_OUT_OF_MEMORY UINT32_MAX

enum { TALLY_GO_CONSUME = 0, TALLY_GO_CHECK = 1, TALLY_GO_RESERVE = 2 };

/* One request of a batch as offsets into a shared text buffer and quantity array, so the
 * array Go passes holds no pointers. */
typedef struct tally_go_request {
  size_t key_offset, key_len;
  size_t resource_offset, resource_len;
  size_t quantities_offset, quantities_len;
  size_t request_id_offset, request_id_len;
  uint64_t at_ms;
} tally_go_request;

/* The request the arguments describe (its strings and quantities borrowed for one call). */
static inline tally_request tally_go_assemble(const char *key, size_t key_len,
                                              const char *resource, size_t resource_len,
                                              const tally_quantity *quantities,
                                              size_t quantities_len, uint64_t at_ms,
                                              const char *request_id, size_t request_id_len) {
  tally_request request = {
      .key = key, .key_len = key_len,
      .resource = resource, .resource_len = resource_len,
      .quantities = quantities, .quantities_len = quantities_len,
      .at_ms = at_ms,
      .request_id = request_id, .request_id_len = request_id_len,
  };
  return request;
}

/* Consumes, checks or reserves one request (`kind`); `lease_ms` and `reservation_out` are
 * read only for TALLY_GO_RESERVE. */
static inline uint32_t tally_go_decide(const tally_engine *engine, int kind,
                                       const char *key, size_t key_len,
                                       const char *resource, size_t resource_len,
                                       const tally_quantity *quantities, size_t quantities_len,
                                       uint64_t at_ms,
                                       const char *request_id, size_t request_id_len,
                                       uint64_t lease_ms,
                                       tally_decision *decision_out,
                                       uint64_t *reservation_out) {
  tally_request request = tally_go_assemble(key, key_len, resource, resource_len, quantities,
                                            quantities_len, at_ms, request_id, request_id_len);
  switch (kind) {
    case TALLY_GO_CONSUME:
      return tally_engine_consume(engine, &request, decision_out);
    case TALLY_GO_CHECK:
      return tally_engine_check(engine, &request, decision_out);
    default:
      return tally_engine_reserve(engine, &request, lease_ms, decision_out, reservation_out);
  }
}

/* Submits one consume (tally_engine_submit) with the request assembled here. */
static inline uint32_t tally_go_submit(const tally_engine *engine,
                                       const char *key, size_t key_len,
                                       const char *resource, size_t resource_len,
                                       const tally_quantity *quantities, size_t quantities_len,
                                       uint64_t at_ms,
                                       const char *request_id, size_t request_id_len,
                                       tally_submission **submission_out) {
  tally_request request = tally_go_assemble(key, key_len, resource, resource_len, quantities,
                                            quantities_len, at_ms, request_id, request_id_len);
  return tally_engine_submit(engine, &request, submission_out);
}

/* Consumes a batch described by `requests` (offsets into `text` and `quantities`). An empty
 * request id (length 0) is passed as NULL: none. */
static inline uint32_t tally_go_consume_many(const tally_engine *engine, const char *text,
                                             const tally_quantity *quantities,
                                             const tally_go_request *requests, size_t count,
                                             uint32_t *statuses_out,
                                             tally_decision *decisions_out) {
  tally_request *batch = calloc(count == 0 ? 1 : count, sizeof *batch);
  if (batch == NULL) {
    return TALLY_GO_OUT_OF_MEMORY;
  }
  for (size_t i = 0; i < count; i++) {
    const tally_go_request *from = &requests[i];
    tally_request *to = &batch[i];
    to->key = text + from->key_offset;
    to->key_len = from->key_len;
    to->resource = text + from->resource_offset;
    to->resource_len = from->resource_len;
    to->quantities = from->quantities_len ? quantities + from->quantities_offset : NULL;
    to->quantities_len = from->quantities_len;
    to->at_ms = from->at_ms;
    to->request_id = from->request_id_len ? text + from->request_id_offset : NULL;
    to->request_id_len = from->request_id_len;
  }
  uint32_t status = tally_engine_consume_many(engine, batch, count,
                                              (tally_status *)statuses_out, decisions_out);
  free(batch);
  return status;
}

#endif
