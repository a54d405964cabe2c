/*
 * The C ABI from C: every exported function, its success path and its error paths. Built by
 * scripts/test-c.sh with -Wall -Wextra -Werror -std=c11 and run plainly and under Valgrind.
 * Prints "N passed, 0 failed" and exits non-zero on any failure.
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tally.h"

/* CLOCK_REALTIME in milliseconds, as the engine's system clock reads it. */
static uint64_t realtime_ms(void) {
  struct timespec now;
  if (clock_gettime(CLOCK_REALTIME, &now) != 0) {
    perror("clock_gettime");
    abort();
  }
  return (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
}

static int passed = 0;
static int failed = 0;

static void print_last_error(void) {
  char message[512];
  size_t needed = 0;
  if (tally_last_error(message, sizeof message, &needed) == TALLY_OK) {
    fprintf(stderr, "    last error: %s\n", message);
  }
}

#define CHECK(condition)                                                   \
  do {                                                                     \
    if (condition) {                                                       \
      passed++;                                                            \
    } else {                                                               \
      failed++;                                                            \
      fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #condition); \
      print_last_error();                                                  \
    }                                                                      \
  } while (0)

#define EXPECT(call, status) CHECK((call) == (status))
#define S(text) text, strlen(text)

/* 2030-03-17T17:46:40Z: the time the engines' own clocks stand at (request ids and closed
 * reservations are remembered relative to the clock), so windows are exact. */
static const uint64_t T0 = 1900000000000ULL;

/* Options for most engines here: a clock of the engine's own at T0 (what the engine measures
 * from its clock does not depend on the day the tests run), and no bound on how far ahead of it
 * a stamp may be (some tests stamp days after T0). Made in main. */
static tally_options *unbounded = NULL;

static tally_request request(const char *key, const char *resource, const tally_quantity *q,
                             size_t n, uint64_t at_ms, const char *request_id) {
  tally_request r;
  memset(&r, 0, sizeof r);
  r.key = key;
  r.key_len = key ? strlen(key) : 0;
  r.resource = resource;
  r.resource_len = resource ? strlen(resource) : 0;
  r.quantities = q;
  r.quantities_len = n;
  r.at_ms = at_ms;
  r.request_id = request_id;
  r.request_id_len = request_id ? strlen(request_id) : 0;
  return r;
}

/* Whether the calling thread's last error mentions `text`. */
static int last_error_mentions(const char *text) {
  char message[512];
  size_t needed = 0;
  return tally_last_error(message, sizeof message, &needed) == TALLY_OK &&
         strstr(message, text) != NULL;
}

/* Whether entry `index` of this thread's last batch has the message `text` exactly. */
static int batch_entry_error_is(size_t index, const char *text) {
  char message[512];
  size_t needed = 0;
  return tally_batch_entry_error(index, message, sizeof message, &needed) == TALLY_OK &&
         strcmp(message, text) == 0 && needed == strlen(text) + 1;
}

static int batch_entry_error_mentions(size_t index, const char *text) {
  char message[512];
  size_t needed = 0;
  return tally_batch_entry_error(index, message, sizeof message, &needed) == TALLY_OK &&
         strstr(message, text) != NULL;
}

static void test_library(void) {
  CHECK(strcmp(tally_version(), TALLY_VERSION) == 0);
  char expected[32];
  snprintf(expected, sizeof expected, "%d.%d.%d", TALLY_VERSION_MAJOR, TALLY_VERSION_MINOR,
           TALLY_VERSION_PATCH);
  CHECK(strcmp(expected, TALLY_VERSION) == 0);
  CHECK(strcmp(tally_status_name(TALLY_OK), "TALLY_OK") == 0);
  CHECK(strcmp(tally_status_name(TALLY_BUFFER_TOO_SMALL), "TALLY_BUFFER_TOO_SMALL") == 0);
  CHECK(strcmp(tally_status_name(TALLY_NOT_DURABLE), "TALLY_NOT_DURABLE") == 0);
  CHECK(strcmp(tally_status_name(TALLY_RESERVATION_EXPIRED), "TALLY_RESERVATION_EXPIRED") == 0);
  CHECK(TALLY_RESERVATION_CLOSED == 26 && TALLY_RESERVATION_EXPIRED == 36);
  CHECK(strcmp(tally_status_name(4000000000u), "TALLY_UNKNOWN_STATUS") == 0);

  /* The last error: a failure sets it, the size query does not clobber it. */
  EXPECT(tally_engine_close(NULL), TALLY_NULL_POINTER);
  size_t needed = 0;
  EXPECT(tally_last_error(NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  CHECK(needed > 1);
  char tiny[4];
  EXPECT(tally_last_error(tiny, sizeof tiny, &needed), TALLY_BUFFER_TOO_SMALL);
  char *message = malloc(needed);
  EXPECT(tally_last_error(message, needed, &needed), TALLY_OK);
  CHECK(strstr(message, "NULL") != NULL);
  free(message);
  EXPECT(tally_last_error(NULL, 0, NULL), TALLY_NULL_POINTER);
  tally_engine_free(NULL);
  passed++;
}

static void test_policies(void) {
  tally_engine *engine = NULL;
  EXPECT(tally_engine_open_in_memory(99, NULL, 0, NULL, &engine), TALLY_BAD_ENUM);
  CHECK(engine == NULL);
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, NULL, NULL),
         TALLY_NULL_POINTER);
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, S("x"), NULL, &engine),
         TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_TOML, S("time_zone = 3"), NULL, &engine),
         TALLY_POLICY_INVALID);
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_JSON, S("{"), NULL, &engine),
         TALLY_POLICY_INVALID);
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_TOML, NULL, 5, NULL, &engine),
         TALLY_NULL_POINTER);
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_FILE, S("/nonexistent/policy.toml"), NULL,
                                     &engine),
         TALLY_POLICY_INVALID);

  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, unbounded, &engine), TALLY_OK);
  size_t needed = 0;
  EXPECT(tally_engine_policy_json(engine, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  char *json = malloc(needed);
  EXPECT(tally_engine_policy_json(engine, json, needed, &needed), TALLY_OK);
  CHECK(strstr(json, "\"Starter\"") != NULL);

  /* The same document as JSON text and as a .json file. */
  tally_engine *from_json = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_JSON, json, strlen(json), unbounded, &from_json),
         TALLY_OK);
  char dir[] = "/tmp/tally-c-policy-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[64];
  snprintf(path, sizeof path, "%s/policy.json", dir);
  int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
  CHECK(fd >= 0);
  CHECK(write(fd, json, strlen(json)) == (ssize_t)strlen(json));
  close(fd);
  tally_engine *from_file = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_FILE, path, strlen(path), unbounded, &from_file),
         TALLY_OK);
  unlink(path);
  rmdir(dir);

  /* Swap: the same policy again, then an invalid one (nothing changes). */
  EXPECT(tally_engine_swap_policy(engine, TALLY_POLICY_JSON, json, strlen(json), T0), TALLY_OK);
  EXPECT(tally_engine_swap_policy(engine, TALLY_POLICY_TOML, S("nonsense ="), T0),
         TALLY_POLICY_INVALID);
  EXPECT(tally_engine_swap_policy(engine, 7, NULL, 0, T0), TALLY_BAD_ENUM);
  EXPECT(tally_engine_swap_policy(NULL, TALLY_POLICY_DEFAULT, NULL, 0, T0), TALLY_NULL_POINTER);
  free(json);

  /* An in-memory engine has no log. */
  uint64_t seq = 0;
  EXPECT(tally_engine_checkpoint(engine, &seq), TALLY_NOT_DURABLE);
  EXPECT(tally_engine_sync(engine), TALLY_NOT_DURABLE);

  EXPECT(tally_engine_close(from_json), TALLY_OK);
  EXPECT(tally_engine_close(from_file), TALLY_OK);
  EXPECT(tally_engine_close(engine), TALLY_OK);
  tally_engine_free(from_json);
  tally_engine_free(from_file);
  tally_engine_free(engine);
}

static void test_admin(tally_engine *engine) {
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada"), T0), TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada-2"), T0), TALLY_ALREADY_EXISTS);
  EXPECT(tally_engine_create_user(engine, S(""), S("k"), T0), TALLY_EMPTY_STRING);
  EXPECT(tally_engine_create_user(engine, NULL, 3, S("k"), T0), TALLY_NULL_POINTER);
  EXPECT(tally_engine_create_user(engine, "a\0b", 3, S("k"), T0), TALLY_NUL_IN_STRING);
  EXPECT(tally_engine_create_user(engine, "\xff\xfe", 2, S("k"), T0), TALLY_INVALID_UTF8);
  char long_key[TALLY_MAX_ID_BYTES + 2];
  memset(long_key, 'k', sizeof long_key - 1);
  long_key[sizeof long_key - 1] = 0;
  EXPECT(tally_engine_create_user(engine, S("bob"), S(long_key), T0), TALLY_STRING_TOO_LONG);
  EXPECT(tally_engine_create_user(engine, S("bob"), S("k"), UINT64_MAX), TALLY_BAD_TIMESTAMP);
  EXPECT(tally_engine_create_user(engine, S("bob"), S("tp-bob"), TALLY_NOW), TALLY_OK);

  EXPECT(tally_engine_create_team(engine, S("acme"), T0), TALLY_OK);
  EXPECT(tally_engine_create_team(engine, S("acme"), T0), TALLY_ALREADY_EXISTS);
  EXPECT(tally_engine_add_member(engine, S("acme"), S("ada"), S("tp-ada-acme"), T0), TALLY_OK);
  EXPECT(tally_engine_add_member(engine, S("nope"), S("ada"), S("x"), T0), TALLY_UNKNOWN_TEAM);
  EXPECT(tally_engine_add_member(engine, S("acme"), S("nobody"), S("x"), T0), TALLY_UNKNOWN_USER);
  EXPECT(tally_engine_create_payg_key(engine, S("ada"), S("payg-ada"), T0), TALLY_OK);
  EXPECT(tally_engine_create_payg_key(engine, S("nobody"), S("payg-x"), T0), TALLY_UNKNOWN_USER);

  EXPECT(tally_engine_assign_seat(engine, S("@ada"), S("ada"), S("Starter"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@ada"), S("ada"), S("Gold"), T0), TALLY_UNKNOWN_PLAN);
  EXPECT(tally_engine_assign_seat(engine, S("acme"), S("bob"), S("Plus"), T0), TALLY_NOT_A_MEMBER);
  EXPECT(tally_engine_assign_seat(engine, S("acme"), S("ada"), S("Plus"), T0), TALLY_OK);
  EXPECT(tally_engine_unassign_seat(engine, S("acme"), S("ada"), T0), TALLY_OK);

  uint64_t balance = 0;
  EXPECT(tally_engine_top_up(engine, S("acme"), 5000000, T0, &balance), TALLY_OK);
  CHECK(balance == 5000000);
  EXPECT(tally_engine_top_up(engine, S("acme"), UINT64_MAX, T0, &balance), TALLY_OVERFLOW);
  CHECK(balance == 5000000);
  EXPECT(tally_engine_top_up(engine, S("acme"), 1, T0, NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_withdraw_credits(engine, S("acme"), 1000000, T0, &balance), TALLY_OK);
  CHECK(balance == 4000000);
  EXPECT(tally_engine_withdraw_credits(engine, S("acme"), 99000000, T0, &balance),
         TALLY_INSUFFICIENT_CREDITS);
  EXPECT(tally_engine_credits(engine, S("acme"), &balance), TALLY_OK);
  CHECK(balance == 4000000);
  EXPECT(tally_engine_credits(engine, S("nope"), &balance), TALLY_UNKNOWN_TEAM);
}

static void test_admission(tally_engine *engine) {
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_decision d;
  tally_request r = request("tp-ada", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &r, &d), TALLY_OK);
  CHECK(d.admitted && !d.replayed);
  CHECK(d.charged_to == TALLY_CHARGED_TO_PLAN_QUOTA);
  CHECK(d.denial == TALLY_DENIAL_NONE);
  CHECK(strcmp(d.plan, "Starter") == 0);
  CHECK(d.limit_index != TALLY_NO_INDEX && d.limit_amount == 1500 && d.remaining == 1499);
  CHECK(strstr(d.limit_name, "rolling:5h") != NULL);
  CHECK(d.limit_count >= 1 && d.limits[0].used == 1);

  EXPECT(tally_engine_check(engine, &r, &d), TALLY_OK);
  CHECK(d.admitted && d.remaining == 1498);

  /* Unknown key: a denial, not an error. */
  tally_request unknown = request("tp-nobody", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &unknown, &d), TALLY_OK);
  CHECK(!d.admitted && d.denial == TALLY_DENIAL_UNKNOWN_KEY && d.charged_to == TALLY_CHARGED_TO_NONE);
  tally_request no_seat = request("tp-bob", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &no_seat, &d), TALLY_OK);
  CHECK(!d.admitted && d.denial == TALLY_DENIAL_NO_RESOURCES);

  /* A revoked key: denied whatever its seat; its member gets a new key in its place. */
  EXPECT(tally_engine_create_user(engine, S("rex"), S("tp-rex"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@rex"), S("rex"), S("Max"), T0), TALLY_OK);
  tally_request rex = request("tp-rex", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &rex, &d), TALLY_OK);
  CHECK(d.admitted);
  bool revoked = false;
  EXPECT(tally_engine_revoke_key(engine, S("tp-rex"), T0, &revoked), TALLY_OK);
  CHECK(revoked);
  EXPECT(tally_engine_revoke_key(engine, S("tp-rex"), T0, &revoked), TALLY_OK);
  CHECK(!revoked);
  EXPECT(tally_engine_revoke_key(engine, S("tp-rex"), T0, NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_revoke_key(engine, S("tp-nobody"), T0, &revoked), TALLY_UNKNOWN_KEY);
  EXPECT(tally_engine_revoke_key(engine, S(""), T0, &revoked), TALLY_EMPTY_STRING);
  EXPECT(tally_engine_consume(engine, &rex, &d), TALLY_OK);
  CHECK(!d.admitted && d.denial == TALLY_DENIAL_KEY_REVOKED);
  EXPECT(tally_engine_add_member(engine, S("@rex"), S("rex"), S("tp-rex-2"), T0), TALLY_OK);
  EXPECT(tally_engine_add_member(engine, S("@rex"), S("rex"), S("tp-rex-3"), T0),
         TALLY_ALREADY_EXISTS);

  /* Credits pay once the plan does not cover it (acme key has no seat, credits). */
  tally_request credits = request("tp-ada-acme", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &credits, &d), TALLY_OK);
  CHECK(d.admitted && d.charged_to == TALLY_CHARGED_TO_CREDITS && d.charged_micros > 0);
  CHECK(d.has_credits_balance && d.credits_balance_micros < 4000000);

  tally_request payg = request("payg-ada", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &payg, &d), TALLY_OK);
  CHECK(d.admitted && d.charged_to == TALLY_CHARGED_TO_PAY_AS_YOU_GO);

  /* Bad input. */
  EXPECT(tally_engine_consume(NULL, &r, &d), TALLY_NULL_POINTER);
  EXPECT(tally_engine_consume(engine, NULL, &d), TALLY_NULL_POINTER);
  CHECK(last_error_mentions("request: is NULL"));
  EXPECT(tally_engine_consume(engine, &r, NULL), TALLY_NULL_POINTER);
  tally_quantity zero[] = {{TALLY_UNIT_REQUESTS, 0}};
  tally_request bad = request("tp-ada", "m2.7", zero, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_QUANTITY);
  tally_quantity huge[] = {{TALLY_UNIT_REQUESTS, UINT64_MAX}};
  bad = request("tp-ada", "m2.7", huge, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_QUANTITY);
  tally_quantity past_largest[] = {{TALLY_UNIT_REQUESTS, TALLY_MAX_QUANTITY + 1}};
  bad = request("tp-ada", "m2.7", past_largest, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_QUANTITY);
  tally_quantity largest[] = {{TALLY_UNIT_REQUESTS, TALLY_MAX_QUANTITY}};
  bad = request("tp-ada", "m2.7", largest, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_OK); /* more than the plan: a denial */
  CHECK(!d.admitted);
  tally_quantity twice[] = {{TALLY_UNIT_REQUESTS, 1}, {TALLY_UNIT_REQUESTS, 1}};
  bad = request("tp-ada", "m2.7", twice, 2, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_QUANTITY);
  tally_quantity bad_unit[] = {{42, 1}};
  bad = request("tp-ada", "m2.7", bad_unit, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_ENUM);
  bad = request("tp-ada", "m2.7", NULL, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_NULL_POINTER);
  bad = request("tp-ada", "m2.7", one, 0, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_QUANTITY);
  bad = request("tp-ada", "no-such-model", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_UNKNOWN_RESOURCE);
  bad = request("tp-ada", "m2.7", one, 1, UINT64_MAX, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_BAD_TIMESTAMP);
  bad = request("", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_EMPTY_STRING);
  bad = request("tp-ada", "m2.7", one, 1, T0, NULL);
  bad.request_id_len = 3; /* NULL id with a length */
  EXPECT(tally_engine_consume(engine, &bad, &d), TALLY_NULL_POINTER);

  /* Request ids: a replay counts nothing; another amount under the same id conflicts. */
  tally_request first = request("tp-ada", "m2.7", one, 1, T0, "req-1");
  EXPECT(tally_engine_consume(engine, &first, &d), TALLY_OK);
  CHECK(d.admitted && !d.replayed);
  uint64_t remaining = d.remaining;
  EXPECT(tally_engine_consume(engine, &first, &d), TALLY_OK);
  CHECK(d.admitted && d.replayed && d.remaining == remaining);
  tally_quantity two[] = {{TALLY_UNIT_REQUESTS, 2}};
  tally_request conflict = request("tp-ada", "m2.7", two, 1, T0, "req-1");
  EXPECT(tally_engine_consume(engine, &conflict, &d), TALLY_REQUEST_ID_CONFLICT);

  /* A batch: one good, one unknown resource. */
  tally_request batch[2] = {request("tp-ada", "m2.7", one, 1, T0, NULL),
                            request("tp-ada", "nope", one, 1, T0, NULL)};
  tally_status statuses[2];
  tally_decision decisions[2];
  EXPECT(tally_engine_consume_many(engine, batch, 2, statuses, decisions), TALLY_OK);
  CHECK(statuses[0] == TALLY_OK && decisions[0].admitted);
  CHECK(statuses[1] == TALLY_UNKNOWN_RESOURCE);
  CHECK(batch_entry_error_is(0, ""));
  CHECK(batch_entry_error_mentions(1, "\"nope\""));
  CHECK(batch_entry_error_is(2, "")); /* past the batch */

  /* Each refused entry says what was wrong with it, naming the field, as a single call's
   * last error does; the entries decided say nothing. */
  tally_request mixed[4] = {request("tp-ada", "m2.7", one, 1, T0, NULL),
                            request("tp-ada", "m2.7", one, 0, T0, NULL),
                            request("", "m2.7", one, 1, T0, NULL),
                            request("tp-ada", "m2.7", two, 1, T0, "req-1")};
  tally_status mixed_statuses[4];
  tally_decision mixed_decisions[4];
  EXPECT(tally_engine_consume(engine, &mixed[1], &d), TALLY_BAD_QUANTITY);
  char single[512];
  size_t single_needed = 0;
  EXPECT(tally_last_error(single, sizeof single, &single_needed), TALLY_OK);
  EXPECT(tally_engine_consume_many(engine, mixed, 4, mixed_statuses, mixed_decisions), TALLY_OK);
  CHECK(mixed_statuses[0] == TALLY_OK && mixed_statuses[1] == TALLY_BAD_QUANTITY &&
        mixed_statuses[2] == TALLY_EMPTY_STRING && mixed_statuses[3] == TALLY_REQUEST_ID_CONFLICT);
  CHECK(batch_entry_error_is(0, ""));
  CHECK(batch_entry_error_is(1, single)); /* the words of the single call's */
  CHECK(batch_entry_error_mentions(1, "quantities"));
  CHECK(batch_entry_error_mentions(2, "key"));
  CHECK(batch_entry_error_mentions(3, "req-1"));
  /* The size query, and a buffer too small: nothing written, the message kept. */
  size_t entry_needed = 0;
  EXPECT(tally_batch_entry_error(1, NULL, 0, &entry_needed), TALLY_BUFFER_TOO_SMALL);
  CHECK(entry_needed == strlen(single) + 1);
  char tiny[2] = {'x', 'y'};
  EXPECT(tally_batch_entry_error(1, tiny, sizeof tiny, &entry_needed), TALLY_BUFFER_TOO_SMALL);
  CHECK(tiny[0] == 'x' && tiny[1] == 'y');
  EXPECT(tally_batch_entry_error(1, tiny, sizeof tiny, NULL), TALLY_NULL_POINTER);
  CHECK(batch_entry_error_is(1, single));
  /* The last error is the single call's still: a batch that ran sets none. */
  CHECK(last_error_mentions("quantities"));
  /* A batch that fails as a whole leaves no entry messages (its own is the last error). */
  EXPECT(tally_engine_consume_many(engine, batch, 0, statuses, decisions), TALLY_INVALID_ARGUMENT);
  CHECK(batch_entry_error_is(1, ""));
  CHECK(last_error_mentions("count"));
  EXPECT(tally_engine_consume_many(engine, NULL, 2, statuses, decisions), TALLY_NULL_POINTER);
  EXPECT(tally_engine_consume_many(engine, batch, 2, NULL, decisions), TALLY_NULL_POINTER);
  /* The bound: TALLY_MAX_BATCH entries are decided, one more refuses the batch (before it
   * reads an entry) naming count. */
  EXPECT(tally_engine_consume_many(engine, batch, TALLY_MAX_BATCH + 1, statuses, decisions),
         TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("count"));
  tally_request *full = calloc(TALLY_MAX_BATCH, sizeof *full);
  tally_status *full_statuses = calloc(TALLY_MAX_BATCH, sizeof *full_statuses);
  tally_decision *full_decisions = calloc(TALLY_MAX_BATCH, sizeof *full_decisions);
  CHECK(full != NULL && full_statuses != NULL && full_decisions != NULL);
  if (full != NULL && full_statuses != NULL && full_decisions != NULL) {
    /* An unknown key: each entry decided (a denial), nothing counted for the tests after. */
    for (size_t i = 0; i < TALLY_MAX_BATCH; i++) {
      full[i] = request("tp-nobody", "m2.7", one, 1, T0, NULL);
    }
    full[TALLY_MAX_BATCH - 1] = request("tp-ada", "nope", one, 1, T0, NULL);
    EXPECT(tally_engine_consume_many(engine, full, TALLY_MAX_BATCH, full_statuses, full_decisions),
           TALLY_OK);
    size_t decided = 0;
    for (size_t i = 0; i + 1 < TALLY_MAX_BATCH; i++) {
      decided += full_statuses[i] == TALLY_OK && !full_decisions[i].admitted &&
                 full_decisions[i].denial == TALLY_DENIAL_UNKNOWN_KEY;
    }
    CHECK(decided == TALLY_MAX_BATCH - 1);
    CHECK(full_statuses[TALLY_MAX_BATCH - 1] == TALLY_UNKNOWN_RESOURCE);
    CHECK(batch_entry_error_mentions(TALLY_MAX_BATCH - 1, "\"nope\""));
  }
  free(full);
  free(full_statuses);
  free(full_decisions);

  /* Refund the request admitted under req-1, once. */
  EXPECT(tally_engine_refund(engine, S("req-1"), T0), TALLY_OK);
  CHECK(tally_engine_refund(engine, S("req-1"), T0) != TALLY_OK);
  EXPECT(tally_engine_refund(engine, S("req-unknown"), T0), TALLY_UNKNOWN_REQUEST);

  /* One song per request at most. */
  tally_quantity songs[] = {{TALLY_UNIT_SONGS, 100}, {TALLY_UNIT_SECONDS, 100}};
  tally_request music = request("tp-ada", "music-2.6", songs, 2, T0, NULL);
  EXPECT(tally_engine_consume(engine, &music, &d), TALLY_OK);
  CHECK(!d.admitted && d.denial == TALLY_DENIAL_OVER_REQUEST_MAXIMUM);
  CHECK(d.unit == TALLY_UNIT_SONGS && d.requested == 100 && d.maximum == 1);

  /* Exhaust cy's Starter window (1,500 requests in 5 hours): a denial with a retry time. */
  EXPECT(tally_engine_create_user(engine, S("cy"), S("tp-cy"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@cy"), S("cy"), S("Starter"), T0), TALLY_OK);
  tally_quantity too_many[] = {{TALLY_UNIT_REQUESTS, 1501}};
  tally_request cy = request("tp-cy", "m2.7", too_many, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &cy, &d), TALLY_OK);
  CHECK(!d.admitted && d.denial == TALLY_DENIAL_EXCEEDS_LIMIT && d.maximum == 1500);
  tally_quantity all[] = {{TALLY_UNIT_REQUESTS, 1500}};
  cy = request("tp-cy", "m2.7", all, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &cy, &d), TALLY_OK);
  CHECK(d.admitted && d.remaining == 0);
  cy = request("tp-cy", "m2.7", one, 1, T0 + 1000, NULL);
  EXPECT(tally_engine_consume(engine, &cy, &d), TALLY_OK);
  CHECK(!d.admitted && d.denial == TALLY_DENIAL_QUOTA_EXHAUSTED);
  CHECK(d.retry_after_ms > 0 && d.retry_at_ms > T0 && d.reset_at_ms > T0 && d.remaining == 0);
  CHECK(d.limit_amount == 1500 && strstr(d.limit_name, "rolling:5h") != NULL);
  CHECK(strcmp(d.upgrade_plan, "") != 0);
}

/* Submitted consumes: many in flight from one thread, each completed once. The request's
 * strings live on the heap and are freed right after submitting (Valgrind would see the
 * library read them later). */
static tally_submission *submit_copy(tally_engine *engine, const char *key, uint64_t amount,
                                     const char *request_id, tally_status *status) {
  char *key_copy = strdup(key);
  char *resource = strdup("m2.7");
  char *id_copy = request_id ? strdup(request_id) : NULL;
  tally_quantity q[] = {{TALLY_UNIT_REQUESTS, amount}};
  tally_request r = request(key_copy, resource, q, 1, T0, id_copy);
  tally_submission *submission = NULL;
  *status = tally_engine_submit(engine, &r, &submission);
  free(key_copy);
  free(resource);
  free(id_copy);
  return submission;
}

static void test_submissions(tally_engine *engine) {
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_decision d;
  tally_request probe = request("tp-ada", "m2.7", one, 1, T0, NULL);
  /* A check answers what would remain after the request: one less than remains now. */
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  uint64_t remaining_before = d.remaining + 1;
  CHECK(remaining_before > 70);

  enum { IN_FLIGHT = 64 };
  tally_submission *in_flight[IN_FLIGHT];
  tally_status status;
  for (int i = 0; i < IN_FLIGHT; i++) {
    char id[32];
    snprintf(id, sizeof id, "sub-%d", i);
    in_flight[i] = submit_copy(engine, "tp-ada", 1, i % 2 ? id : NULL, &status);
    EXPECT(status, TALLY_OK);
    CHECK(in_flight[i] != NULL);
  }
  /* Applied at submission: a check sees all of them before any completes. */
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  CHECK(d.remaining + 1 == remaining_before - IN_FLIGHT);
  bool durable = false;
  EXPECT(tally_engine_submission_durable(engine, in_flight[0], &durable), TALLY_OK);
  EXPECT(tally_engine_submission_durable(engine, in_flight[0], NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_submission_durable(engine, NULL, &durable), TALLY_NULL_POINTER);
  for (int i = 0; i < IN_FLIGHT; i++) {
    memset(&d, 0, sizeof d);
    EXPECT(tally_engine_complete(engine, in_flight[i], &d), TALLY_OK);
    CHECK(d.admitted && !d.replayed && d.remaining == remaining_before - 1 - (uint64_t)i);
    CHECK(strcmp(d.plan, "Starter") == 0);
  }
  /* Completed: durable, so a repeated id replays at once. */
  tally_submission *again = submit_copy(engine, "tp-ada", 1, "sub-1", &status);
  EXPECT(status, TALLY_OK);
  EXPECT(tally_engine_submission_durable(engine, again, &durable), TALLY_OK);
  CHECK(durable);
  EXPECT(tally_engine_complete(engine, again, &d), TALLY_OK);
  CHECK(d.admitted && d.replayed && d.remaining == remaining_before - 2);
  /* Bad input: its status, nothing written, nothing counted. */
  tally_submission *untouched = (tally_submission *)&status;
  tally_request bad = request("tp-ada", "nope", one, 1, T0, NULL);
  EXPECT(tally_engine_submit(engine, &bad, &untouched), TALLY_UNKNOWN_RESOURCE);
  CHECK(untouched == (tally_submission *)&status);
  EXPECT(tally_engine_submit(engine, &probe, NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_submit(engine, NULL, &untouched), TALLY_NULL_POINTER);
  EXPECT(tally_engine_submit(NULL, &probe, &untouched), TALLY_NULL_POINTER);
  tally_quantity two[] = {{TALLY_UNIT_REQUESTS, 2}};
  tally_request conflict = request("tp-ada", "m2.7", two, 1, T0, "sub-1");
  EXPECT(tally_engine_submit(engine, &conflict, &untouched), TALLY_REQUEST_ID_CONFLICT);
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  CHECK(d.remaining + 1 == remaining_before - IN_FLIGHT);
  /* Complete takes the submission whatever it returns: NULL outputs and a foreign engine
   * still free it (Valgrind checks that nothing leaks). */
  EXPECT(tally_engine_complete(engine, NULL, &d), TALLY_NULL_POINTER);
  tally_submission *s1 = submit_copy(engine, "tp-ada", 1, NULL, &status);
  EXPECT(tally_engine_complete(engine, s1, NULL), TALLY_NULL_POINTER);
  tally_submission *s2 = submit_copy(engine, "tp-ada", 1, NULL, &status);
  EXPECT(tally_engine_complete(NULL, s2, &d), TALLY_NULL_POINTER);
  tally_engine *other = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, unbounded, &other), TALLY_OK);
  tally_submission *s3 = submit_copy(engine, "tp-ada", 1, NULL, &status);
  EXPECT(tally_engine_submission_durable(other, s3, &durable), TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_complete(other, s3, &d), TALLY_INVALID_ARGUMENT);
  tally_engine_free(other);
  /* Freed uncompleted: the effect stays. */
  tally_submission *s4 = submit_copy(engine, "tp-ada", 1, NULL, &status);
  tally_submission_free(s4);
  tally_submission_free(NULL);
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  CHECK(d.remaining + 1 == remaining_before - IN_FLIGHT - 4);
}

static void test_reservations(tally_engine *engine) {
  tally_quantity estimate[] = {{TALLY_UNIT_REQUESTS, 1}, {TALLY_UNIT_TOKENS, 1000}};
  tally_request r = request("tp-ada", "m2.7", estimate, 2, T0, NULL);
  tally_decision d;
  uint64_t id = 0;
  EXPECT(tally_engine_reserve(engine, &r, 0, &d, &id), TALLY_OK);
  CHECK(d.admitted && id != 0);
  tally_quantity actual[] = {{TALLY_UNIT_REQUESTS, 1}, {TALLY_UNIT_TOKENS, 700}};
  /* Bad amounts are named by the argument that holds them. */
  tally_quantity too_much[] = {{TALLY_UNIT_REQUESTS, 1}, {TALLY_UNIT_TOKENS, TALLY_MAX_QUANTITY + 1}};
  EXPECT(tally_engine_settle(engine, id, too_much, 2, T0, &d), TALLY_BAD_QUANTITY);
  CHECK(last_error_mentions("actual: "));
  EXPECT(tally_engine_settle(engine, id, NULL, 2, T0, &d), TALLY_NULL_POINTER);
  CHECK(last_error_mentions("actual: "));
  EXPECT(tally_engine_settle(engine, id, actual, 2, T0, &d), TALLY_OK);
  CHECK(d.admitted && d.charged_to == TALLY_CHARGED_TO_PLAN_QUOTA);
  EXPECT(tally_engine_void(engine, id, T0), TALLY_RESERVATION_CLOSED);
  EXPECT(tally_engine_settle(engine, 0, actual, 2, T0, &d), TALLY_UNKNOWN_RESERVATION);
  EXPECT(tally_engine_settle(engine, 999999, actual, 2, T0, &d), TALLY_UNKNOWN_RESERVATION);

  uint64_t second = 0;
  EXPECT(tally_engine_reserve(engine, &r, 60000, &d, &second), TALLY_OK);
  EXPECT(tally_engine_void(engine, second, T0), TALLY_OK);
  EXPECT(tally_engine_void(engine, second, T0), TALLY_OK);
  EXPECT(tally_engine_settle(engine, second, NULL, 0, T0, &d), TALLY_RESERVATION_CLOSED);

  uint64_t third = 0, expired = 0;
  EXPECT(tally_engine_reserve(engine, &r, 1, &d, &third), TALLY_OK);
  EXPECT(tally_engine_expire_reservations(engine, T0 + 1000, &expired), TALLY_OK);
  CHECK(expired <= 1);
  /* Its lease ended: expired, not merely closed; voiding it is a no-op. */
  EXPECT(tally_engine_settle(engine, third, actual, 2, T0 + 1000, &d), TALLY_RESERVATION_EXPIRED);
  CHECK(last_error_mentions("expired"));
  EXPECT(tally_engine_void(engine, third, T0 + 1000), TALLY_OK);
  EXPECT(tally_engine_expire_reservations(engine, T0, NULL), TALLY_NULL_POINTER);

  tally_request with_id = request("tp-ada", "m2.7", estimate, 2, T0, "res-id");
  EXPECT(tally_engine_reserve(engine, &with_id, 0, &d, &id), TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_reserve(engine, &r, 0, &d, NULL), TALLY_NULL_POINTER);
}

static void test_usage(tally_engine *engine) {
  size_t needed = 0;
  EXPECT(tally_engine_usage(engine, S("tp-ada"), T0, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  CHECK(needed > 10);
  char small[8];
  size_t needed_again = 0;
  EXPECT(tally_engine_usage(engine, S("tp-ada"), T0, small, sizeof small, &needed_again),
         TALLY_BUFFER_TOO_SMALL);
  CHECK(needed_again == needed);
  char *json = malloc(needed);
  EXPECT(tally_engine_usage(engine, S("tp-ada"), T0, json, needed, &needed), TALLY_OK);
  CHECK(strlen(json) + 1 == needed);
  CHECK(strstr(json, "\"plan\":\"Starter\"") != NULL);
  free(json);
  EXPECT(tally_engine_usage(engine, S("tp-nobody"), T0, NULL, 0, &needed), TALLY_UNKNOWN_KEY);
  EXPECT(tally_engine_usage(engine, S("tp-ada"), T0, NULL, 0, NULL), TALLY_NULL_POINTER);
}

/* Usage corrections, and the memory of idle keys: on an engine of their own, since a reclaim
 * moves every idle key's time forward. */
static void test_corrections(void) {
  tally_engine *engine = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, unbounded, &engine), TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("cora"), S("tp-cora"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@cora"), S("cora"), S("Starter"), T0), TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("dan"), S("tp-dan"), T0), TALLY_OK);
  EXPECT(tally_engine_create_payg_key(engine, S("cora"), S("payg-cora"), T0), TALLY_OK);
  tally_quantity ten[] = {{TALLY_UNIT_REQUESTS, 10}};
  tally_decision d;
  tally_request r = request("tp-cora", "m2.7", ten, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &r, &d), TALLY_OK);
  CHECK(d.admitted);

  /* 30 requests that happened at T0 and were not counted: counted now, on the 5-hour limit. */
  tally_quantity thirty[] = {{TALLY_UNIT_REQUESTS, 30}};
  tally_adjustment a;
  memset(&a, 0xAB, sizeof a);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), thirty, 1, T0,
                                   TALLY_ADJUST_ADD, T0 + 60000, &a),
         TALLY_OK);
  CHECK(a.limit_count == 1);
  CHECK(a.limits[0].limit_index == 0 && a.limits[0].moved == 30);
  CHECK(strcmp(a.limits[0].name, "m2.7:requests per rolling:5h") == 0);
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request probe = request("tp-cora", "m2.7", one, 1, T0 + 60000, NULL);
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  /* A check's statuses count the request checked: 40 counted, plus 1. */
  CHECK(d.limit_count == 1 && d.limits[0].used == 41);

  /* Removing 50 gives back the 40 that count, no more. */
  tally_quantity fifty[] = {{TALLY_UNIT_REQUESTS, 50}};
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), fifty, 1, T0,
                                   TALLY_ADJUST_REMOVE, T0 + 60000, &a),
         TALLY_OK);
  CHECK(a.limit_count == 1 && a.limits[0].moved == 40);
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  CHECK(d.limits[0].used == 1);

  /* Bad input changes nothing and leaves the output alone. */
  memset(&a, 0xAB, sizeof a);
  tally_adjustment untouched;
  memcpy(&untouched, &a, sizeof a);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), thirty, 1, T0, 0, T0, &a),
         TALLY_BAD_ENUM);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), thirty, 1, T0, 3, T0, &a),
         TALLY_BAD_ENUM);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), thirty, 1, TALLY_NOW,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_BAD_TIMESTAMP);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), thirty, 1, T0 + 1,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-nobody"), S("m2.7"), thirty, 1, T0,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_UNKNOWN_KEY);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m9"), thirty, 1, T0,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_UNKNOWN_RESOURCE);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), NULL, 0, T0,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_BAD_QUANTITY);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-dan"), S("m2.7"), thirty, 1, T0,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_adjust_usage(engine, S("payg-cora"), S("m2.7"), thirty, 1, T0,
                                   TALLY_ADJUST_ADD, T0, &a),
         TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_adjust_usage(engine, NULL, 7, S("m2.7"), thirty, 1, T0, TALLY_ADJUST_ADD,
                                   T0, &a),
         TALLY_NULL_POINTER);
  EXPECT(tally_engine_adjust_usage(engine, S("tp-cora"), S("m2.7"), thirty, 1, T0,
                                   TALLY_ADJUST_ADD, T0, NULL),
         TALLY_NULL_POINTER);
  CHECK(memcmp(&a, &untouched, sizeof a) == 0);
  EXPECT(tally_engine_check(engine, &probe, &d), TALLY_OK);
  CHECK(d.limits[0].used == 1);

  /* Memory: cora's windows stay while they count something (10 requests again), and are
   * reclaimed once those have aged out of the 5-hour window. */
  EXPECT(tally_engine_consume(engine, &r, &d), TALLY_OK);
  tally_memory_stats before, after;
  EXPECT(tally_engine_memory_stats(engine, &before), TALLY_OK);
  CHECK(before.keys == 3 && before.keys_with_usage == 1 && before.usage_bytes > 0);
  CHECK(before.table_bytes > 0);
  uint64_t reclaimed = 99;
  EXPECT(tally_engine_reclaim_idle(engine, T0 + 60000, &reclaimed), TALLY_OK);
  CHECK(reclaimed == 0);
  const uint64_t six_hours = 6ULL * 3600 * 1000;
  EXPECT(tally_engine_reclaim_idle(engine, T0 + six_hours, &reclaimed), TALLY_OK);
  CHECK(reclaimed == 1);
  EXPECT(tally_engine_memory_stats(engine, &after), TALLY_OK);
  CHECK(after.keys == 3 && after.keys_with_usage == 0 && after.usage_bytes == 0);
  /* Its next request starts from empty windows. */
  tally_request later = request("tp-cora", "m2.7", one, 1, T0 + six_hours, NULL);
  EXPECT(tally_engine_consume(engine, &later, &d), TALLY_OK);
  CHECK(d.admitted && d.limits[0].used == 1);
  EXPECT(tally_engine_reclaim_idle(engine, T0, NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_memory_stats(engine, NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_memory_stats(NULL, &after), TALLY_NULL_POINTER);
  tally_engine_free(engine);
}

static void test_log(tally_engine *engine) {
  size_t needed = 0;
  EXPECT(tally_engine_events_after(engine, 0, 1000, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  char *json = malloc(needed);
  EXPECT(tally_engine_events_after(engine, 0, 1000, json, needed, &needed), TALLY_OK);
  CHECK(json[0] == '[' && strstr(json, "\"policy_swapped\"") != NULL);
  CHECK(strstr(json, "\"usage_admitted\"") != NULL);
  /* Each event names the team it concerns; a policy swap none. */
  CHECK(strstr(json, "\"team\":\"@ada\"") != NULL);
  CHECK(strstr(json, "\"team\":null") != NULL);
  free(json);
  EXPECT(tally_engine_events_after(engine, 0, 0, NULL, 0, &needed), TALLY_INVALID_ARGUMENT);

  uint64_t seq = 99;
  EXPECT(tally_engine_cursor(engine, S("billing"), &seq), TALLY_OK);
  CHECK(seq == 0);
  EXPECT(tally_engine_save_cursor(engine, S("billing"), 3), TALLY_OK);
  EXPECT(tally_engine_cursor(engine, S("billing"), &seq), TALLY_OK);
  CHECK(seq == 3);
  EXPECT(tally_engine_save_cursor(engine, S("billing"), UINT64_MAX - 1), TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_cursor(engine, S(""), &seq), TALLY_EMPTY_STRING);
  bool existed = false;
  EXPECT(tally_engine_delete_cursor(engine, S("billing"), &existed), TALLY_OK);
  CHECK(existed);
  EXPECT(tally_engine_delete_cursor(engine, S("billing"), &existed), TALLY_OK);
  CHECK(!existed);
  EXPECT(tally_engine_cursor(engine, S("billing"), &seq), TALLY_OK);
  CHECK(seq == 0);
  EXPECT(tally_engine_delete_cursor(engine, S("billing"), NULL), TALLY_NULL_POINTER);
  EXPECT(tally_engine_delete_cursor(engine, S(""), &existed), TALLY_EMPTY_STRING);
  char listed[256];
  EXPECT(tally_engine_cursors(engine, listed, sizeof listed, &needed), TALLY_OK);
  CHECK(strcmp(listed, "[]") == 0 && needed == 3);
  EXPECT(tally_engine_save_cursor(engine, S("billing"), 3), TALLY_OK);
  EXPECT(tally_engine_save_cursor(engine, S("audit"), 1), TALLY_OK);
  EXPECT(tally_engine_cursors(engine, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  CHECK(needed == strlen("[{\"after\":1,\"name\":\"audit\"},{\"after\":3,\"name\":\"billing\"}]") + 1);
  EXPECT(tally_engine_cursors(engine, listed, sizeof listed, &needed), TALLY_OK);
  CHECK(strcmp(listed, "[{\"after\":1,\"name\":\"audit\"},{\"after\":3,\"name\":\"billing\"}]") == 0);
  EXPECT(tally_engine_delete_cursor(engine, S("audit"), &existed), TALLY_OK);
  EXPECT(tally_engine_cursors(NULL, listed, sizeof listed, &needed), TALLY_NULL_POINTER);
  /* Nothing went wrong in the background. */
  bool healthy = false;
  char health[256];
  EXPECT(tally_engine_health(engine, &healthy, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  CHECK(!healthy && needed > 1 && needed <= sizeof health);
  EXPECT(tally_engine_health(engine, &healthy, health, sizeof health, &needed), TALLY_OK);
  CHECK(healthy && strstr(health, "\"healthy\":true") != NULL);
  CHECK(strstr(health, "\"log_failure\":null") != NULL);
  CHECK(strstr(health, "\"compaction_failure\":null") != NULL);
  EXPECT(tally_engine_health(engine, NULL, health, sizeof health, &needed), TALLY_NULL_POINTER);

  EXPECT(tally_engine_sync(engine), TALLY_OK);
  EXPECT(tally_engine_checkpoint(engine, &seq), TALLY_OK);
  CHECK(seq > 3);
  uint64_t removed = 99;
  EXPECT(tally_engine_compact(engine, T0, &removed), TALLY_OK);
  EXPECT(tally_engine_compact(engine, T0, NULL), TALLY_NULL_POINTER);
}

struct racer {
  tally_engine *engine;
  int ok;
  int closed;
  int other;
};

static void *race(void *argument) {
  struct racer *racer = argument;
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request r = request("tp-ada", "m2.7", one, 1, T0, NULL);
  tally_decision d;
  for (int i = 0; i < 2000; i++) {
    tally_status status = tally_engine_check(racer->engine, &r, &d);
    if (status == TALLY_OK) {
      racer->ok++;
    } else if (status == TALLY_CLOSED) {
      racer->closed++;
    } else {
      racer->other++;
    }
  }
  return NULL;
}

static void test_close_while_in_use(tally_engine *engine) {
  tally_status status;
  tally_submission *pending = submit_copy(engine, "tp-ada", 1, "pending-at-close", &status);
  EXPECT(status, TALLY_OK);
  tally_engine *other = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, unbounded, &other), TALLY_OK);
  tally_quantity one_request[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request nobody = request("tp-nobody", "m2.7", one_request, 1, T0, NULL);
  tally_submission *foreign = NULL;
  EXPECT(tally_engine_submit(other, &nobody, &foreign), TALLY_OK);
  struct racer racer = {engine, 0, 0, 0};
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, race, &racer) == 0);
  while (racer.ok == 0) {
    sched_yield();
  }
  EXPECT(tally_engine_close(engine), TALLY_OK);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(racer.other == 0 && racer.ok + racer.closed == 2000);
  /* Submitted before a close that succeeded, which flushed its event: completing it after the
   * close answers its decision (an error there read as "not admitted", and a retry without a
   * request id counted it twice). Another engine's submission is still no answer here. */
  tally_decision answered;
  memset(&answered, 0, sizeof answered);
  /* And asked first whether completing it would return at once: it would (the close made it
   * durable), so it is durable, not TALLY_CLOSED (read as "not admitted" the same way). */
  bool durable = false;
  EXPECT(tally_engine_submission_durable(engine, pending, &durable), TALLY_OK);
  CHECK(durable);
  EXPECT(tally_engine_submission_durable(engine, foreign, &durable), TALLY_CLOSED);
  EXPECT(tally_engine_complete(engine, pending, &answered), TALLY_OK);
  CHECK(answered.admitted && !answered.replayed && strcmp(answered.plan, "Starter") == 0);
  EXPECT(tally_engine_complete(engine, foreign, &answered), TALLY_CLOSED);
  tally_engine_free(other);

  /* Use after close and double close: TALLY_CLOSED. */
  tally_decision d;
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request r = request("tp-ada", "m2.7", one, 1, T0, NULL);
  EXPECT(tally_engine_consume(engine, &r, &d), TALLY_CLOSED);
  EXPECT(tally_engine_close(engine), TALLY_CLOSED);
  uint64_t balance = 0;
  EXPECT(tally_engine_credits(engine, S("acme"), &balance), TALLY_CLOSED);
}

/* A consume from a thread-exit destructor (a `pthread_key` one, which glibc runs after the
 * thread's Rust thread-locals are destroyed): a gateway flushing a thread's last requests as
 * the thread ends. It must be decided like any other, and above all must not poison the
 * engine every other thread shares. */
struct exit_consume {
  tally_engine *engine;
  tally_status in_destructor;
  tally_status many_in_destructor;
  tally_status checkpoint_in_destructor;
};

static pthread_key_t exit_key;

static void consume_on_exit(void *argument) {
  struct exit_consume *exit_consume = argument;
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request r = request("tp-exit", "m2.7", one, 1, T0, NULL);
  tally_decision d;
  exit_consume->in_destructor = tally_engine_consume(exit_consume->engine, &r, &d);
  tally_status entry = TALLY_PANIC;
  exit_consume->many_in_destructor =
      tally_engine_consume_many(exit_consume->engine, &r, 1, &entry, &d);
  if (exit_consume->many_in_destructor == TALLY_OK) {
    exit_consume->many_in_destructor = entry;
  }
  uint64_t seq = 0;
  exit_consume->checkpoint_in_destructor = tally_engine_checkpoint(exit_consume->engine, &seq);
}

static void *consume_then_exit(void *argument) {
  struct exit_consume *exit_consume = argument;
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request r = request("tp-exit", "m2.7", one, 1, T0, NULL);
  tally_decision d;
  /* A consume and a checkpoint while the thread lives: their thread-locals are made (and so
   * destroyed at exit). */
  tally_status entry = TALLY_PANIC;
  if (tally_engine_consume(exit_consume->engine, &r, &d) != TALLY_OK || !d.admitted ||
      tally_engine_consume_many(exit_consume->engine, &r, 1, &entry, &d) != TALLY_OK ||
      entry != TALLY_OK) {
    return NULL;
  }
  uint64_t seq = 0;
  if (tally_engine_checkpoint(exit_consume->engine, &seq) != TALLY_OK) {
    return NULL;
  }
  pthread_setspecific(exit_key, exit_consume);
  return NULL;
}

static void test_consume_from_a_thread_exit_destructor(void) {
  char dir[] = "/tmp/tally-c-exit-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char db[256];
  snprintf(db, sizeof db, "%s/db", dir);
  tally_engine *engine = NULL;
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           unbounded, &engine),
         TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("exit"), S("tp-exit"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@exit"), S("exit"), S("Max"), T0), TALLY_OK);
  CHECK(pthread_key_create(&exit_key, consume_on_exit) == 0);
  struct exit_consume exit_consume = {engine, (tally_status)-1, (tally_status)-1,
                                       (tally_status)-1};
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, consume_then_exit, &exit_consume) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(exit_consume.in_destructor == TALLY_OK);
  CHECK(exit_consume.many_in_destructor == TALLY_OK);
  CHECK(exit_consume.checkpoint_in_destructor == TALLY_OK);
  /* The engine is still everyone's: not poisoned by that thread's end. */
  tally_quantity one[] = {{TALLY_UNIT_REQUESTS, 1}};
  tally_request r = request("tp-exit", "m2.7", one, 1, T0, NULL);
  tally_decision d;
  EXPECT(tally_engine_consume(engine, &r, &d), TALLY_OK);
  CHECK(d.admitted);
  pthread_key_delete(exit_key);
  EXPECT(tally_engine_close(engine), TALLY_OK);
  tally_engine_free(engine);
  char command[600];
  snprintf(command, sizeof command, "rm -rf '%s'", dir);
  CHECK(system(command) == 0);
}

/* A directory holding a file that is not a tally database. */
static int make_foreign(const char *dir) {
  if (mkdir(dir, 0700) != 0) {
    return 0;
  }
  char file[300];
  snprintf(file, sizeof file, "%s/notes.txt", dir);
  FILE *notes = fopen(file, "w");
  if (notes == NULL) {
    return 0;
  }
  fputs("not a database\n", notes);
  fclose(notes);
  return 1;
}

/* A setter of a uint64_t option, for the table of cases below. */
typedef tally_status (*u64_setter)(tally_options *, uint64_t);

static void test_options(void) {
  EXPECT(tally_options_new(NULL), TALLY_NULL_POINTER);
  tally_options_free(NULL);
  passed++;

  tally_options *options = NULL;
  EXPECT(tally_options_new(&options), TALLY_OK);
  CHECK(options != NULL);

  /* Every setter: one value past each end is refused, naming the option; the ends are taken. */
  struct {
    const char *name;
    u64_setter set;
    uint64_t low, high; /* the allowed ends */
    int zero_allowed;
  } cases[] = {
      {"max_keys", tally_options_set_max_keys, 1, TALLY_MAX_TABLE_ENTRIES, 0},
      {"max_teams", tally_options_set_max_teams, 1, TALLY_MAX_TABLE_ENTRIES, 0},
      {"max_users", tally_options_set_max_users, 1, TALLY_MAX_TABLE_ENTRIES, 0},
      {"idempotency_capacity", tally_options_set_idempotency_capacity, 1,
       TALLY_MAX_TABLE_ENTRIES, 0},
      {"idempotency_horizon_ms", tally_options_set_idempotency_horizon_ms, 1,
       TALLY_MAX_IDEMPOTENCY_HORIZON_MS, 1},
      {"max_open_reservations", tally_options_set_max_open_reservations, 1,
       TALLY_MAX_TABLE_ENTRIES, 0},
      {"default_lease_ms", tally_options_set_default_lease_ms, 1, TALLY_MAX_LEASE_MS, 0},
      {"max_policy_generations", tally_options_set_max_policy_generations,
       TALLY_MIN_POLICY_GENERATIONS, TALLY_MAX_POLICY_GENERATIONS, 0},
      {"reclaim_idle_every_ms", tally_options_set_reclaim_idle_every_ms, 1, TALLY_MAX_PERIOD_MS,
       1},
      {"checkpoint_every_events", tally_options_set_checkpoint_every_events, 1, UINT64_MAX, 0},
      {"retention_ms", tally_options_set_retention_ms, 0, TALLY_MAX_PERIOD_MS, 1},
      {"max_ahead_of_clock_ms", tally_options_set_max_ahead_of_clock_ms, 1, TALLY_MAX_PERIOD_MS,
       1},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    EXPECT(cases[i].set(NULL, cases[i].low), TALLY_NULL_POINTER);
    EXPECT(cases[i].set(options, cases[i].low), TALLY_OK);
    EXPECT(cases[i].set(options, cases[i].high), TALLY_OK);
    if (cases[i].high < UINT64_MAX) {
      EXPECT(cases[i].set(options, cases[i].high + 1), TALLY_INVALID_ARGUMENT);
      CHECK(last_error_mentions(cases[i].name));
      CHECK(last_error_mentions("out of range"));
      EXPECT(cases[i].set(options, UINT64_MAX), TALLY_INVALID_ARGUMENT);
    }
    if (cases[i].low > 0) {
      EXPECT(cases[i].set(options, cases[i].low - 1),
             cases[i].low - 1 == 0 && cases[i].zero_allowed ? TALLY_OK : TALLY_INVALID_ARGUMENT);
    }
  }
  EXPECT(tally_options_set_expire_leases_on_its_own(NULL, true), TALLY_NULL_POINTER);
  EXPECT(tally_options_set_expire_leases_on_its_own(options, false), TALLY_OK);
  tally_options_free(options);

  /* The default options (NULL) bound stamps to a day ahead of the engine's clock,
   * TALLY_DEFAULT_MAX_AHEAD_OF_CLOCK_MS: two days ahead of the system clock is a bad timestamp
   * naming at_ms, and creates nothing. */
  CHECK(TALLY_DEFAULT_MAX_AHEAD_OF_CLOCK_MS == 86400000ULL);
  tally_engine *bounded = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, NULL, &bounded), TALLY_OK);
  const uint64_t two_days_ahead = realtime_ms() + 2 * 86400000ULL;
  EXPECT(tally_engine_create_user(bounded, S("ada"), S("tp-ada"), two_days_ahead),
         TALLY_BAD_TIMESTAMP);
  CHECK(last_error_mentions("at_ms"));
  CHECK(last_error_mentions("max_ahead_of_clock_ms"));
  EXPECT(tally_engine_create_user(bounded, S("ada"), S("tp-ada"), TALLY_NOW), TALLY_OK);
  tally_engine_free(bounded);

  /* The options reach the engine; a refused value leaves the one set before. */
  EXPECT(tally_options_new(&options), TALLY_OK);
  EXPECT(tally_options_set_max_ahead_of_clock_ms(options, 0), TALLY_OK); /* stamps at T0 */
  EXPECT(tally_options_set_max_keys(options, 1), TALLY_OK);
  EXPECT(tally_options_set_max_keys(options, 0), TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("max_keys: 0 is out of range"));
  tally_engine *engine = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, options, &engine), TALLY_OK);
  /* The engine keeps no pointer to the options. */
  tally_options_free(options);
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada"), T0), TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("bob"), S("tp-bob"), T0), TALLY_CAPACITY_EXCEEDED);
  CHECK(last_error_mentions("keys"));
  tally_engine_free(engine);

  /* A durable engine takes them too; one options value opens several engines. */
  char dir[] = "/tmp/tally-c-options-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char db[256];
  snprintf(db, sizeof db, "%s/db", dir);
  EXPECT(tally_options_new(&options), TALLY_OK);
  EXPECT(tally_options_set_max_ahead_of_clock_ms(options, 0), TALLY_OK); /* stamps at T0 */
  EXPECT(tally_options_set_max_users(options, 1), TALLY_OK);
  EXPECT(tally_options_set_checkpoint_every_events(options, 2), TALLY_OK);
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0, options,
                           &engine),
         TALLY_OK);
  tally_engine *in_memory = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, options, &in_memory),
         TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada"), T0), TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("bob"), S("tp-bob"), T0), TALLY_CAPACITY_EXCEEDED);
  CHECK(last_error_mentions("users"));
  EXPECT(tally_engine_create_user(in_memory, S("ada"), S("tp-ada"), T0), TALLY_OK);
  EXPECT(tally_engine_create_user(in_memory, S("bob"), S("tp-bob"), T0),
         TALLY_CAPACITY_EXCEEDED);
  tally_engine_free(in_memory);
  tally_engine_free(engine);

  /* The database recorded its options: use_recorded reopens it with them (max_users 1), not
   * with the ones set beside it (max_users 5); without it the options given apply (the
   * defaults, unbounded ahead of the clock). */
  tally_options *recorded = NULL;
  EXPECT(tally_options_new(&recorded), TALLY_OK);
  EXPECT(tally_options_set_use_recorded(NULL, true), TALLY_NULL_POINTER);
  EXPECT(tally_options_set_use_recorded(recorded, true), TALLY_OK);
  EXPECT(tally_options_set_max_users(recorded, 5), TALLY_OK);
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           recorded, &engine),
         TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("bob"), S("tp-bob"), T0), TALLY_CAPACITY_EXCEEDED);
  CHECK(last_error_mentions("users"));
  tally_engine_free(engine);
  tally_options_free(recorded);
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           unbounded, &engine),
         TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("bob"), S("tp-bob"), T0), TALLY_OK);
  tally_engine_free(engine);

  /* Bad arguments to open create nothing: no directory for a bad interval. */
  char never[256];
  snprintf(never, sizeof never, "%s/never", dir);
  EXPECT(tally_engine_open(S(never), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_INTERVAL,
                           0, options, &engine),
         TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("interval_ms: "));
  struct stat info;
  CHECK(stat(never, &info) != 0);
  tally_options_free(options);

  char command[600];
  snprintf(command, sizeof command, "rm -rf '%s'", dir);
  CHECK(system(command) == 0);
}

static void test_database(void) {
  char dir[] = "/tmp/tally-c-test-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char db[256];
  snprintf(db, sizeof db, "%s/db", dir);

  tally_engine *engine = NULL;
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, 9, 0, NULL, &engine),
         TALLY_BAD_ENUM);
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_INTERVAL, 0,
                           NULL, &engine),
         TALLY_INVALID_ARGUMENT);
  EXPECT(tally_engine_open(NULL, 0, TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           NULL, &engine),
         TALLY_NULL_POINTER);
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_SYNC, 0,
                           unbounded, &engine),
         TALLY_OK);

  /* The same directory again: locked. */
  tally_engine *second = NULL;
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           NULL, &second),
         TALLY_DATABASE_LOCKED);
  CHECK(second == NULL);

  test_admin(engine);
  test_admission(engine);
  test_submissions(engine);
  test_reservations(engine);
  test_usage(engine);
  test_log(engine);
  test_close_while_in_use(engine);
  tally_engine_free(engine);

  /* Closed: verify it, then open it again and find the usage. */
  bool sound = false;
  size_t needed = 0;
  EXPECT(tally_verify(S(db), NULL, &sound, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  char *report = malloc(needed);
  EXPECT(tally_verify(S(db), NULL, &sound, report, needed, &needed), TALLY_OK);
  CHECK(sound && strstr(report, "\"sound\":true") != NULL);
  free(report);
  EXPECT(tally_verify(S("/nonexistent/tally"), NULL, &sound, NULL, 0, &needed), TALLY_STORAGE);

  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_INTERVAL, 100,
                           unbounded, &engine),
         TALLY_OK);
  uint64_t balance = 0;
  EXPECT(tally_engine_credits(engine, S("acme"), &balance), TALLY_OK);
  CHECK(balance > 0 && balance < 4000000);
  /* Free without close closes it. */
  tally_engine_free(engine);

  /* A directory of other files is foreign. */
  char foreign[256];
  snprintf(foreign, sizeof foreign, "%s/foreign", dir);
  CHECK(make_foreign(foreign));
  EXPECT(tally_engine_open(S(foreign), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           NULL, &engine),
         TALLY_DATABASE_FOREIGN);
  /* Verify answers as open does: a directory of other files, or a file, is foreign. */
  EXPECT(tally_verify(S(foreign), NULL, &sound, NULL, 0, &needed), TALLY_DATABASE_FOREIGN);
  char notes[300];
  snprintf(notes, sizeof notes, "%s/notes.txt", foreign);
  EXPECT(tally_verify(S(notes), NULL, &sound, NULL, 0, &needed), TALLY_DATABASE_FOREIGN);

  char command[600];
  snprintf(command, sizeof command, "rm -rf '%s'", dir);
  CHECK(system(command) == 0);
}

/* Verify replays the log with the options the database was opened with: NULL reads the ones it
 * recorded; options given are used as given (a snapshot kept only `max_policy_generations`
 * policy generations, which a replay under another bound is compared on). */
static void test_verify_options(void) {
  char dir[] = "/tmp/tally-c-verify-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char db[256];
  snprintf(db, sizeof db, "%s/db", dir);

  tally_options *options = NULL;
  EXPECT(tally_options_new(&options), TALLY_OK);
  EXPECT(tally_options_set_max_ahead_of_clock_ms(options, 0), TALLY_OK); /* stamps at T0 */
  EXPECT(tally_options_set_max_policy_generations(options, 2), TALLY_OK);
  tally_engine *engine = NULL;
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0, options,
                           &engine),
         TALLY_OK);
  for (int swap = 0; swap < 4; swap++) {
    EXPECT(tally_engine_swap_policy(engine, TALLY_POLICY_DEFAULT, NULL, 0, T0 + (uint64_t)swap),
           TALLY_OK);
  }
  uint64_t seq = 0;
  EXPECT(tally_engine_checkpoint(engine, &seq), TALLY_OK);
  EXPECT(tally_engine_close(engine), TALLY_OK);
  tally_engine_free(engine);

  /* The options it was opened with: sound. */
  bool sound = false;
  size_t needed = 0;
  EXPECT(tally_verify(S(db), options, &sound, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  char *report = malloc(needed);
  EXPECT(tally_verify(S(db), options, &sound, report, needed, &needed), TALLY_OK);
  CHECK(sound && strstr(report, "\"snapshot_matches_replay\":true") != NULL);
  free(report);

  /* NULL: the options the database recorded when it was opened (2 generations): sound. */
  sound = false;
  EXPECT(tally_verify(S(db), NULL, &sound, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  report = malloc(needed);
  EXPECT(tally_verify(S(db), NULL, &sound, report, needed, &needed), TALLY_OK);
  CHECK(sound && strstr(report, "\"snapshot_matches_replay\":true") != NULL);
  CHECK(strstr(report, "\"replayed_with_recorded_options\":true") != NULL);
  free(report);
  tally_options_free(options);

  /* Options given with nothing set are the defaults (1,024 generations), not what it was opened
   * with: the replay keeps every generation and is compared on those the snapshot kept, so the
   * database is sound under them too, replayed without the recorded options. */
  EXPECT(tally_options_new(&options), TALLY_OK);
  sound = false;
  EXPECT(tally_verify(S(db), options, &sound, NULL, 0, &needed), TALLY_BUFFER_TOO_SMALL);
  report = malloc(needed);
  EXPECT(tally_verify(S(db), options, &sound, report, needed, &needed), TALLY_OK);
  CHECK(sound && strstr(report, "\"snapshot_matches_replay\":true") != NULL);
  CHECK(strstr(report, "\"replayed_with_recorded_options\":false") != NULL);
  free(report);
  tally_options_free(options);

  char command[600];
  snprintf(command, sizeof command, "rm -rf '%s'", dir);
  CHECK(system(command) == 0);
}

/* A policy of its own: Starter with 7 m2.7 requests per 5 hours (the shipped one has 1,500). */
static const char CUSTOM_POLICY[] =
    "time_zone = \"UTC\"\n"
    "[resources.\"m2.7\"]\n"
    "units = [\"requests\"]\n"
    "required = [\"requests\"]\n"
    "price_micros = { requests = 1 }\n"
    "[plans.Starter]\n"
    "limits = [{ resource = \"m2.7\", unit = \"requests\", amount = 7, window = \"rolling:5h\" }]\n";

/* The key's usage report at T0 (malloc'ed), or NULL if it failed. */
static char *usage_of(tally_engine *engine, const char *key) {
  size_t needed = 0;
  if (tally_engine_usage(engine, S(key), T0, NULL, 0, &needed) != TALLY_BUFFER_TOO_SMALL) {
    return NULL;
  }
  char *json = malloc(needed);
  if (tally_engine_usage(engine, S(key), T0, json, needed, &needed) != TALLY_OK) {
    free(json);
    return NULL;
  }
  return json;
}

/* The events after `after_seq` as JSON (malloc'ed), or NULL if it failed. */
static char *events_after(tally_engine *engine, uint64_t after_seq) {
  size_t needed = 0;
  if (tally_engine_events_after(engine, after_seq, 1000, NULL, 0, &needed) !=
      TALLY_BUFFER_TOO_SMALL) {
    return NULL;
  }
  char *json = malloc(needed);
  if (tally_engine_events_after(engine, after_seq, 1000, json, needed, &needed) != TALLY_OK) {
    free(json);
    return NULL;
  }
  return json;
}

/* TALLY_POLICY_STORED opens a database with the policy it last ran with, swapping nothing in and
 * logging nothing; a new database starts with the shipped Token Plan. Nothing else takes it. */
static void test_stored_policy(void) {
  char dir[] = "/tmp/tally-c-stored-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char db[256];
  snprintf(db, sizeof db, "%s/db", dir);
  tally_engine *engine = NULL;

  /* An in-memory engine has no stored policy; a policy text with it is refused and creates
   * nothing. */
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_STORED, NULL, 0, NULL, &engine),
         TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("policy_source"));
  CHECK(engine == NULL);
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_STORED, S(CUSTOM_POLICY), TALLY_DURABILITY_NONE, 0,
                           NULL, &engine),
         TALLY_INVALID_ARGUMENT);
  struct stat info;
  CHECK(stat(db, &info) != 0);

  /* A database with a policy of its own; a swap has no stored policy either. */
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_TOML, S(CUSTOM_POLICY), TALLY_DURABILITY_NONE, 0,
                           unbounded, &engine),
         TALLY_OK);
  EXPECT(tally_engine_swap_policy(engine, TALLY_POLICY_STORED, NULL, 0, T0),
         TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("policy_source"));
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@ada"), S("ada"), S("Starter"), T0), TALLY_OK);
  uint64_t last = 0;
  EXPECT(tally_engine_checkpoint(engine, &last), TALLY_OK);
  EXPECT(tally_engine_close(engine), TALLY_OK);
  tally_engine_free(engine);

  /* Reopened with STORED: its own Starter (7 requests), and no event after the last one. */
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_STORED, NULL, 0, TALLY_DURABILITY_NONE, 0, unbounded,
                           &engine),
         TALLY_OK);
  char *json = usage_of(engine, "tp-ada");
  CHECK(json != NULL && strstr(json, "\"amount\":7") != NULL &&
        strstr(json, "\"amount\":1500") == NULL);
  free(json);
  json = events_after(engine, last);
  CHECK(json != NULL && strcmp(json, "[]") == 0);
  free(json);
  EXPECT(tally_engine_close(engine), TALLY_OK);
  tally_engine_free(engine);

  /* Reopened with DEFAULT instead: the shipped policy is swapped in (1,500) and logged. */
  EXPECT(tally_engine_open(S(db), TALLY_POLICY_DEFAULT, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           unbounded, &engine),
         TALLY_OK);
  json = usage_of(engine, "tp-ada");
  CHECK(json != NULL && strstr(json, "\"amount\":1500") != NULL);
  free(json);
  json = events_after(engine, last);
  CHECK(json != NULL && strstr(json, "\"policy_swapped\"") != NULL);
  free(json);
  tally_engine_free(engine);

  /* A new database opened with STORED runs the shipped Token Plan. */
  char fresh[256];
  snprintf(fresh, sizeof fresh, "%s/fresh", dir);
  EXPECT(tally_engine_open(S(fresh), TALLY_POLICY_STORED, NULL, 0, TALLY_DURABILITY_NONE, 0,
                           unbounded, &engine),
         TALLY_OK);
  EXPECT(tally_engine_create_user(engine, S("bo"), S("tp-bo"), T0), TALLY_OK);
  EXPECT(tally_engine_assign_seat(engine, S("@bo"), S("bo"), S("Starter"), T0), TALLY_OK);
  json = usage_of(engine, "tp-bo");
  CHECK(json != NULL && strstr(json, "\"amount\":1500") != NULL);
  free(json);
  tally_engine_free(engine);

  char command[600];
  snprintf(command, sizeof command, "rm -rf '%s'", dir);
  CHECK(system(command) == 0);
}

/* An engine with a clock of its own reads only the time it was set to; an engine on the system
 * clock refuses to be set. */
static void test_clock(void) {
  const uint64_t day = 86400000ULL;
  tally_options *options = NULL;
  EXPECT(tally_options_new(&options), TALLY_OK);
  EXPECT(tally_options_set_manual_clock(options, 4102444800000ULL), TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("manual_clock_ms"));
  EXPECT(tally_options_set_manual_clock(options, T0), TALLY_OK);
  tally_engine *engine = NULL;
  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, options, &engine), TALLY_OK);
  tally_options_free(options);
  uint64_t now = 0;
  EXPECT(tally_engine_clock(engine, &now), TALLY_OK);
  CHECK(now == T0);
  /* The default bound (a day ahead) is measured from T0, and follows the clock. */
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada"), T0 + 2 * day),
         TALLY_BAD_TIMESTAMP);
  EXPECT(tally_engine_set_clock(engine, T0 + 2 * day), TALLY_OK);
  EXPECT(tally_engine_clock(engine, &now), TALLY_OK);
  CHECK(now == T0 + 2 * day);
  EXPECT(tally_engine_create_user(engine, S("ada"), S("tp-ada"), TALLY_NOW), TALLY_OK);
  EXPECT(tally_engine_set_clock(engine, 0), TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("now_ms"));
  EXPECT(tally_engine_clock(engine, &now), TALLY_OK);
  CHECK(now == T0 + 2 * day);
  tally_engine_free(engine);

  EXPECT(tally_engine_open_in_memory(TALLY_POLICY_DEFAULT, NULL, 0, NULL, &engine), TALLY_OK);
  EXPECT(tally_engine_set_clock(engine, T0), TALLY_INVALID_ARGUMENT);
  CHECK(last_error_mentions("tally_options_set_manual_clock"));
  /* The system's, read as the engine reads it (CLOCK_REALTIME to the millisecond). Not
   * time(NULL): that reads the coarse clock, which lags it by up to a tick, so a second
   * turning over between the readings failed this check now and then. */
  const uint64_t before = realtime_ms();
  EXPECT(tally_engine_clock(engine, &now), TALLY_OK);
  CHECK(now >= before && now <= realtime_ms());
  EXPECT(tally_engine_clock(engine, NULL), TALLY_NULL_POINTER);
  tally_engine_free(engine);
}

int main(void) {
  if (tally_options_new(&unbounded) != TALLY_OK ||
      tally_options_set_max_ahead_of_clock_ms(unbounded, 0) != TALLY_OK ||
      tally_options_set_manual_clock(unbounded, T0) != TALLY_OK) {
    return 1;
  }
  test_library();
  test_policies();
  test_corrections();
  test_options();
  test_clock();
  test_database();
  test_verify_options();
  test_stored_policy();
  test_consume_from_a_thread_exit_destructor();
  tally_options_free(unbounded);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
