//! Bad input at the C boundary, through the exported functions (the rlib): each case gets its
//! own status and none crashes.

use std::ffi::c_char;
use std::ptr;
use std::sync::Arc;

use tally::*;

const T0: u64 = 1_900_000_000_000; // 2030-03-17T17:46:40Z
const HOUR_MS: u64 = 3_600_000;

struct Handle(*mut tally_engine);

// SAFETY: the C handle is documented as safe to share between threads.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        tally_engine_free(self.0);
    }
}

fn s(text: &str) -> (*const c_char, usize) {
    (text.as_ptr().cast(), text.len())
}

/// Options for these tests' engines: a clock of the engine's own standing at `T0`, so what
/// the engine measures from its clock (request ids remembered, leases ended, idle keys freed)
/// does not depend on the day the tests run, and no bound on how far ahead of it a stamp may
/// be (some tests stamp days after `T0`). Freed when dropped.
struct Unbounded(*mut tally_options);

impl Unbounded {
    fn new() -> Unbounded {
        let mut options = ptr::null_mut();
        assert_eq!(tally_options_new(&mut options), tally_status::TALLY_OK);
        assert_eq!(
            tally_options_set_max_ahead_of_clock_ms(options, 0),
            tally_status::TALLY_OK
        );
        assert_eq!(
            tally_options_set_manual_clock(options, T0),
            tally_status::TALLY_OK
        );
        Unbounded(options)
    }
}

impl Drop for Unbounded {
    fn drop(&mut self) {
        tally_options_free(self.0);
    }
}

fn in_memory() -> Handle {
    let mut engine = ptr::null_mut();
    let options = Unbounded::new();
    assert_eq!(
        tally_engine_open_in_memory(0, ptr::null(), 0, options.0, &mut engine),
        tally_status::TALLY_OK
    );
    Handle(engine)
}

/// The default options (a NULL `tally_options`) bound stamps to a day ahead of the engine's
/// clock: one further ahead is `TALLY_BAD_TIMESTAMP` naming `at_ms` and changes nothing; one
/// within the day is taken.
#[test]
fn by_default_a_stamp_more_than_a_day_ahead_is_a_bad_timestamp() {
    assert_eq!(TALLY_DEFAULT_MAX_AHEAD_OF_CLOCK_MS, 86_400_000);
    let mut engine = ptr::null_mut();
    assert_eq!(
        tally_engine_open_in_memory(0, ptr::null(), 0, ptr::null(), &mut engine),
        tally_status::TALLY_OK
    );
    let handle = Handle(engine);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let (u, ul) = s("ada");
    let (k, kl) = s("tp-ada");
    assert_eq!(
        tally_engine_create_user(handle.0, u, ul, k, kl, now + 48 * HOUR_MS),
        tally_status::TALLY_BAD_TIMESTAMP
    );
    assert!(last_error().starts_with("at_ms: "), "{}", last_error());
    assert!(
        last_error().contains("max_ahead_of_clock_ms"),
        "{}",
        last_error()
    );
    // Nothing was created: the same user is created within the day.
    assert_eq!(
        tally_engine_create_user(handle.0, u, ul, k, kl, now + HOUR_MS),
        tally_status::TALLY_OK
    );
    let (t, tl) = s("@ada");
    let (p, pl) = s("Starter");
    assert_eq!(
        tally_engine_assign_seat(handle.0, t, tl, u, ul, p, pl, now),
        tally_status::TALLY_OK
    );
    let one = requests(1);
    let far = request(b"tp-ada", "m2.7", &one, now + 30 * 24 * HOUR_MS, None);
    assert_eq!(
        consume(&handle, &far).err(),
        Some(tally_status::TALLY_BAD_TIMESTAMP)
    );
    let near = request(b"tp-ada", "m2.7", &one, now + 23 * HOUR_MS, None);
    assert!(consume(&handle, &near).is_ok_and(|decision| decision.admitted));
}

fn user(handle: &Handle, name: &str, key: &str, plan: Option<&str>) {
    let (u, ul) = s(name);
    let (k, kl) = s(key);
    assert_eq!(
        tally_engine_create_user(handle.0, u, ul, k, kl, T0),
        tally_status::TALLY_OK
    );
    if let Some(plan) = plan {
        let team = format!("@{name}");
        let (t, tl) = s(&team);
        let (p, pl) = s(plan);
        assert_eq!(
            tally_engine_assign_seat(handle.0, t, tl, u, ul, p, pl, T0),
            tally_status::TALLY_OK
        );
    }
}

fn request<'a>(
    key: &'a [u8],
    resource: &'a str,
    quantities: &'a [tally_quantity],
    at_ms: u64,
    request_id: Option<&'a [u8]>,
) -> tally_request {
    tally_request {
        key: key.as_ptr().cast(),
        key_len: key.len(),
        resource: resource.as_ptr().cast(),
        resource_len: resource.len(),
        quantities: quantities.as_ptr(),
        quantities_len: quantities.len(),
        at_ms,
        request_id: request_id.map_or(ptr::null(), |id| id.as_ptr().cast()),
        request_id_len: request_id.map_or(0, <[u8]>::len),
    }
}

fn requests(amount: u64) -> [tally_quantity; 1] {
    [tally_quantity {
        unit: tally_unit::TALLY_UNIT_REQUESTS as u32,
        amount,
    }]
}

fn consume(handle: &Handle, request: &tally_request) -> Result<tally_decision, tally_status> {
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    match tally_engine_consume(handle.0, request, decision.as_mut_ptr()) {
        // SAFETY: written on TALLY_OK.
        tally_status::TALLY_OK => Ok(unsafe { decision.assume_init() }),
        status => Err(status),
    }
}

/// Adjusts one m2.7 request of `key`'s usage at T0 in `direction`: the status, and the
/// adjustment as the call left it (all zero unless it succeeded).
fn adjust_one_request(
    handle: &Handle,
    key: &str,
    direction: u32,
) -> (tally_status, tally_adjustment) {
    adjust_one_request_at(handle, key, direction, T0, T0)
}

/// `adjust_one_request` for usage at `usage_at_ms`, the adjustment made at `at_ms`.
fn adjust_one_request_at(
    handle: &Handle,
    key: &str,
    direction: u32,
    usage_at_ms: u64,
    at_ms: u64,
) -> (tally_status, tally_adjustment) {
    let ((k, kl), (r, rl)) = (s(key), s("m2.7"));
    let one = requests(1);
    // SAFETY: plain integers and char arrays, for which all-zero is a valid value.
    let mut adjustment: tally_adjustment = unsafe { std::mem::zeroed() };
    let status = tally_engine_adjust_usage(
        handle.0,
        k,
        kl,
        r,
        rl,
        one.as_ptr(),
        one.len(),
        usage_at_ms,
        direction,
        at_ms,
        &mut adjustment,
    );
    (status, adjustment)
}

fn last_error() -> String {
    let mut needed = 0;
    let _ = tally_last_error(ptr::null_mut(), 0, &mut needed);
    let mut buf = vec![0u8; needed];
    assert_eq!(
        tally_last_error(buf.as_mut_ptr().cast(), buf.len(), &mut needed),
        tally_status::TALLY_OK
    );
    buf.pop();
    String::from_utf8(buf).unwrap_or_default()
}

fn name(array: &[c_char]) -> String {
    let bytes: Vec<u8> = array
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).unwrap_or_default()
}

#[test]
fn null_handles_and_null_pointers_with_lengths_are_null_pointer() {
    let handle = in_memory();
    let one = requests(1);
    let good = request(b"k", "m2.7", &one, T0, None);
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    use tally_status::TALLY_NULL_POINTER as NULL;
    assert_eq!(
        tally_engine_consume(ptr::null(), &good, decision.as_mut_ptr()),
        NULL
    );
    assert_eq!(
        tally_engine_consume(handle.0, ptr::null(), decision.as_mut_ptr()),
        NULL
    );
    assert_eq!(tally_engine_consume(handle.0, &good, ptr::null_mut()), NULL);
    let mut bad = good;
    bad.key = ptr::null();
    assert_eq!(consume(&handle, &bad).err(), Some(NULL));
    assert!(last_error().contains("key"));
    let mut bad = good;
    bad.quantities = ptr::null();
    assert_eq!(consume(&handle, &bad).err(), Some(NULL));
    let mut bad = good;
    bad.request_id_len = 5;
    assert_eq!(consume(&handle, &bad).err(), Some(NULL));
    assert!(last_error().contains("request_id"));
    assert_eq!(tally_engine_create_team(handle.0, ptr::null(), 3, T0), NULL);
    let mut needed = 0;
    let (k, kl) = s("k");
    assert_eq!(
        tally_engine_usage(handle.0, k, kl, T0, ptr::null_mut(), 0, ptr::null_mut()),
        NULL
    );
    assert_eq!(tally_engine_close(ptr::null()), NULL);
    assert_eq!(tally_last_error(ptr::null_mut(), 0, ptr::null_mut()), NULL);
    assert_eq!(
        tally_engine_usage(ptr::null(), k, kl, T0, ptr::null_mut(), 0, &mut needed),
        NULL
    );
    tally_engine_free(ptr::null_mut());
}

#[test]
fn bad_keys_and_request_ids_each_get_their_own_status() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let one = requests(1);
    let long = vec![b'k'; TALLY_MAX_ID_BYTES + 1];
    let cases: [(&[u8], tally_status); 4] = [
        (b"", tally_status::TALLY_EMPTY_STRING),
        (b"\xff\xfe", tally_status::TALLY_INVALID_UTF8),
        (&long, tally_status::TALLY_STRING_TOO_LONG),
        (b"tp\0ada", tally_status::TALLY_NUL_IN_STRING),
    ];
    for (bytes, status) in cases {
        let as_key = request(bytes, "m2.7", &one, T0, None);
        assert_eq!(
            consume(&handle, &as_key).err(),
            Some(status),
            "key {bytes:?}"
        );
        let as_id = request(b"tp-ada", "m2.7", &one, T0, Some(bytes));
        assert_eq!(consume(&handle, &as_id).err(), Some(status), "id {bytes:?}");
        assert!(last_error().starts_with("request_id"));
    }
    let exactly_long = vec![b'k'; TALLY_MAX_ID_BYTES];
    let at_bound = request(&exactly_long, "m2.7", &one, T0, None);
    let decision = consume(&handle, &at_bound).expect("a 128-byte key is allowed");
    assert_eq!(
        decision.denial,
        tally_denial::TALLY_DENIAL_UNKNOWN_KEY as u32
    );
    let newline = request(b"tp-ada", "m2.7", &one, T0, Some(b"a\nb"));
    assert_eq!(
        consume(&handle, &newline).err(),
        Some(tally_status::TALLY_INVALID_ARGUMENT)
    );
}

/// A user's name may be `TALLY_MAX_ID_BYTES` long, so their Default Team's, `@` and the name,
/// is one byte longer: every call that names a team must take it, or the user can never be
/// seated or given credits through the C ABI.
#[test]
fn the_default_team_of_a_user_with_the_longest_name_can_be_named() {
    let handle = in_memory();
    let name = "u".repeat(TALLY_MAX_ID_BYTES);
    user(&handle, &name, "tp-long", Some("Starter"));
    let team = format!("@{name}");
    let (t, tl) = s(&team);
    let (u, ul) = s(&name);
    let mut balance = 0;
    assert_eq!(
        tally_engine_top_up(handle.0, t, tl, 5, T0, &mut balance),
        tally_status::TALLY_OK
    );
    assert_eq!(
        tally_engine_withdraw_credits(handle.0, t, tl, 2, T0, &mut balance),
        tally_status::TALLY_OK
    );
    assert_eq!(
        tally_engine_credits(handle.0, t, tl, &mut balance),
        tally_status::TALLY_OK
    );
    assert_eq!(balance, 3);
    assert_eq!(
        tally_engine_unassign_seat(handle.0, t, tl, u, ul, T0),
        tally_status::TALLY_OK
    );
    let (k, kl) = s("tp-long-2");
    assert_eq!(
        tally_engine_add_member(handle.0, t, tl, u, ul, k, kl, T0),
        tally_status::TALLY_ALREADY_EXISTS,
        "one key per user per team: the team was found"
    );
    // One byte more is no team's name.
    let longer = format!("@{name}u");
    let (l, ll) = s(&longer);
    assert_eq!(
        tally_engine_credits(handle.0, l, ll, &mut balance),
        tally_status::TALLY_STRING_TOO_LONG
    );
    assert!(last_error().starts_with("team: "), "{}", last_error());
    // A team one creates never starts with `@`, so its name stays within TALLY_MAX_ID_BYTES.
    let created = "t".repeat(TALLY_MAX_ID_BYTES + 1);
    let (c, cl) = s(&created);
    assert_eq!(
        tally_engine_create_team(handle.0, c, cl, T0),
        tally_status::TALLY_STRING_TOO_LONG
    );
}

#[test]
fn bad_quantities_are_bad_quantity_and_overflowing_sums_overflow() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let unit = |unit: tally_unit, amount| tally_quantity {
        unit: unit as u32,
        amount,
    };
    use tally_unit::*;
    let cases: [(&[tally_quantity], tally_status); 6] = [
        (
            &[unit(TALLY_UNIT_REQUESTS, 0)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (
            &[unit(TALLY_UNIT_REQUESTS, u64::MAX)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (
            &[unit(TALLY_UNIT_REQUESTS, (1 << 40) + 1)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (&[], tally_status::TALLY_BAD_QUANTITY),
        (
            &[unit(TALLY_UNIT_REQUESTS, 1), unit(TALLY_UNIT_REQUESTS, 1)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (
            &[tally_quantity { unit: 7, amount: 1 }],
            tally_status::TALLY_BAD_ENUM,
        ),
    ];
    for (quantities, status) in cases {
        let bad = request(b"tp-ada", "m2.7", quantities, T0, None);
        assert_eq!(consume(&handle, &bad).err(), Some(status), "{quantities:?}");
    }
    let eight = [unit(TALLY_UNIT_REQUESTS, 1); 8];
    let bad = request(b"tp-ada", "m2.7", &eight, T0, None);
    assert_eq!(
        consume(&handle, &bad).err(),
        Some(tally_status::TALLY_BAD_QUANTITY)
    );
    // The largest quantity is allowed; it just does not fit the plan.
    let largest = [unit(TALLY_UNIT_REQUESTS, 1 << 40)];
    let decision = consume(&handle, &request(b"tp-ada", "m2.7", &largest, T0, None));
    assert!(decision.is_ok_and(|decision| !decision.admitted));
    // Balances: a top-up past the credits bound (2^63 - 1 with everything charged) overflows
    // and changes nothing.
    let (team, team_len) = s("@ada");
    let mut balance = 0;
    let bound = i64::MAX as u64;
    assert_eq!(
        tally_engine_top_up(handle.0, team, team_len, bound - 5, T0, &mut balance),
        tally_status::TALLY_OK
    );
    assert_eq!(
        tally_engine_top_up(handle.0, team, team_len, 10, T0, &mut balance),
        tally_status::TALLY_OVERFLOW
    );
    assert_eq!(balance, bound - 5);
}

#[test]
fn a_request_id_reused_with_another_key_or_amount_conflicts_and_a_repeat_is_replayed() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    user(&handle, "bob", "tp-bob", Some("Starter"));
    let (one, two) = (requests(1), requests(2));
    let first =
        consume(&handle, &request(b"tp-ada", "m2.7", &one, T0, Some(b"r1"))).expect("decided");
    assert!(first.admitted && !first.replayed);
    let again =
        consume(&handle, &request(b"tp-ada", "m2.7", &one, T0, Some(b"r1"))).expect("decided");
    assert!(again.admitted && again.replayed);
    assert_eq!(again.remaining, first.remaining);
    for conflict in [
        request(b"tp-bob", "m2.7", &one, T0, Some(b"r1")),
        request(b"tp-ada", "m2.7", &two, T0, Some(b"r1")),
        request(b"tp-ada", "m2.7-highspeed", &one, T0, Some(b"r1")),
    ] {
        assert_eq!(
            consume(&handle, &conflict).err(),
            Some(tally_status::TALLY_REQUEST_ID_CONFLICT)
        );
    }
}

#[test]
fn timestamps_at_the_extremes_going_backwards_and_on_boundaries() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let one = requests(1);
    // 0 is "now": the engine's clock (its own, standing at T0).
    let now =
        consume(&handle, &request(b"tp-ada", "m2.7", &one, TALLY_NOW, None)).expect("decided");
    assert!(now.admitted && now.at_ms == T0);
    // 1 ms after the epoch is a real timestamp (counted at the newest time the key has seen).
    let early = consume(&handle, &request(b"tp-ada", "m2.7", &one, 1, None)).expect("decided");
    assert!(early.admitted);
    for at_ms in [u64::MAX, 4_102_444_800_000] {
        assert_eq!(
            consume(&handle, &request(b"tp-ada", "m2.7", &one, at_ms, None)).err(),
            Some(tally_status::TALLY_BAD_TIMESTAMP)
        );
    }
    assert!(consume(
        &handle,
        &request(b"tp-ada", "m2.7", &one, 4_102_444_799_999, None)
    )
    .is_ok());

    // A rolling window, exactly on its boundary: denied 1 ms before retry_at, admitted at it.
    user(&handle, "cy", "tp-cy", Some("Starter"));
    let all = requests(1_500);
    assert!(consume(&handle, &request(b"tp-cy", "m2.7", &all, T0, None)).is_ok_and(|d| d.admitted));
    let denied = consume(
        &handle,
        &request(b"tp-cy", "m2.7", &one, T0 + HOUR_MS, None),
    )
    .expect("decided");
    assert_eq!(
        denied.denial,
        tally_denial::TALLY_DENIAL_QUOTA_EXHAUSTED as u32
    );
    assert_eq!(denied.retry_at_ms, T0 + HOUR_MS + denied.retry_after_ms);
    assert!(name(&denied.limit_name).contains("rolling:5h"));
    let before = request(b"tp-cy", "m2.7", &one, denied.retry_at_ms - 1, None);
    assert!(consume(&handle, &before).is_ok_and(|d| !d.admitted));
    let at = request(b"tp-cy", "m2.7", &one, denied.retry_at_ms, None);
    assert!(consume(&handle, &at).is_ok_and(|d| d.admitted));
    // Going backwards after that never releases quota early.
    let back = request(b"tp-cy", "m2.7", &all, T0, None);
    assert!(consume(&handle, &back).is_ok_and(|d| !d.admitted));

    // A daily limit, exactly at local midnight (Asia/Shanghai).
    user(&handle, "di", "tp-di", Some("Starter"));
    let song = [
        tally_quantity {
            unit: tally_unit::TALLY_UNIT_SONGS as u32,
            amount: 1,
        },
        tally_quantity {
            unit: tally_unit::TALLY_UNIT_SECONDS as u32,
            amount: 200,
        },
    ];
    for _ in 0..100 {
        let decision = consume(&handle, &request(b"tp-di", "music-2.6", &song, T0, None));
        assert!(decision.is_ok_and(|d| d.admitted));
    }
    let denied =
        consume(&handle, &request(b"tp-di", "music-2.6", &song, T0, None)).expect("decided");
    assert_eq!(
        denied.denial,
        tally_denial::TALLY_DENIAL_QUOTA_EXHAUSTED as u32
    );
    let midnight = denied.reset_at_ms;
    assert_eq!(
        (midnight + 8 * HOUR_MS) % (24 * HOUR_MS),
        0,
        "local midnight"
    );
    let before = request(b"tp-di", "music-2.6", &song, midnight - 1, None);
    assert!(consume(&handle, &before).is_ok_and(|d| !d.admitted));
    let at = request(b"tp-di", "music-2.6", &song, midnight, None);
    assert!(consume(&handle, &at).is_ok_and(|d| d.admitted));
}

#[test]
fn out_of_range_enum_values_are_bad_enum() {
    let mut engine = ptr::null_mut();
    let dir = temp_dir("enums");
    let (p, pl) = s(dir.to_str().unwrap_or_default());
    assert_eq!(
        tally_engine_open(p, pl, 0, ptr::null(), 0, 3, 0, ptr::null(), &mut engine),
        tally_status::TALLY_BAD_ENUM
    );
    assert_eq!(
        tally_engine_open(p, pl, 5, ptr::null(), 0, 0, 0, ptr::null(), &mut engine),
        tally_status::TALLY_BAD_ENUM
    );
    assert_eq!(
        tally_engine_open_in_memory(u32::MAX, ptr::null(), 0, ptr::null(), &mut engine),
        tally_status::TALLY_BAD_ENUM
    );
    assert!(engine.is_null());
    let handle = in_memory();
    let bad = [tally_quantity {
        unit: u32::MAX,
        amount: 1,
    }];
    assert_eq!(
        consume(&handle, &request(b"k", "m2.7", &bad, T0, None)).err(),
        Some(tally_status::TALLY_BAD_ENUM)
    );
    user(&handle, "ada", "tp-ada", Some("Starter"));
    for direction in [0, 3, u32::MAX] {
        let (status, adjustment) = adjust_one_request(&handle, "tp-ada", direction);
        assert_eq!(
            status,
            tally_status::TALLY_BAD_ENUM,
            "direction {direction}"
        );
        assert!(last_error().contains("direction"), "{}", last_error());
        assert_eq!(adjustment.limit_count, 0, "nothing written on an error");
    }
}

#[test]
fn a_too_small_buffer_answers_the_size_needed() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Plus"));
    let (k, kl) = s("tp-ada");
    let mut needed = 0;
    assert_eq!(
        tally_engine_usage(handle.0, k, kl, T0, ptr::null_mut(), 0, &mut needed),
        tally_status::TALLY_BUFFER_TOO_SMALL
    );
    let mut buf = vec![0x55u8; needed];
    let mut short_needed = 0;
    assert_eq!(
        tally_engine_usage(
            handle.0,
            k,
            kl,
            T0,
            buf.as_mut_ptr().cast(),
            needed - 1,
            &mut short_needed
        ),
        tally_status::TALLY_BUFFER_TOO_SMALL
    );
    assert_eq!(short_needed, needed);
    assert!(buf.iter().all(|&byte| byte == 0x55), "nothing copied");
    assert_eq!(
        tally_engine_usage(
            handle.0,
            k,
            kl,
            T0,
            buf.as_mut_ptr().cast(),
            needed,
            &mut needed
        ),
        tally_status::TALLY_OK
    );
    assert_eq!(buf.last(), Some(&0));
    let json: serde_json::Value =
        serde_json::from_slice(&buf[..needed - 1]).expect("the report is JSON");
    assert_eq!(json["plan"], "Plus");
    assert_eq!(json["limits"].as_array().map(Vec::len), Some(4));
}

#[test]
fn double_close_and_use_after_close_are_closed() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    assert_eq!(tally_engine_close(handle.0), tally_status::TALLY_OK);
    assert_eq!(tally_engine_close(handle.0), tally_status::TALLY_CLOSED);
    let one = requests(1);
    assert_eq!(
        consume(&handle, &request(b"tp-ada", "m2.7", &one, T0, None)).err(),
        Some(tally_status::TALLY_CLOSED)
    );
    let (t, tl) = s("@ada");
    let mut balance = 0;
    assert_eq!(
        tally_engine_credits(handle.0, t, tl, &mut balance),
        tally_status::TALLY_CLOSED
    );
    let mut reclaimed = 0;
    assert_eq!(
        tally_engine_reclaim_idle(handle.0, T0, &mut reclaimed),
        tally_status::TALLY_CLOSED
    );
    let mut stats = tally_memory_stats::default();
    assert_eq!(
        tally_engine_memory_stats(handle.0, &mut stats),
        tally_status::TALLY_CLOSED
    );
    let add = tally_adjustment_direction::TALLY_ADJUST_ADD as u32;
    assert_eq!(
        adjust_one_request(&handle, "tp-ada", add).0,
        tally_status::TALLY_CLOSED
    );
}

#[test]
fn close_while_other_threads_are_inside_calls_is_safe() {
    let handle = Arc::new(in_memory());
    user(&handle, "ada", "tp-ada", Some("Max"));
    // How many threads have had a call answered: the close comes once all of them are
    // calling. (A 20 ms sleep stood for that, and on a loaded machine a thread not yet run
    // by then had no call answered before the close.)
    let calling = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let handle = Arc::clone(&handle);
            let calling = Arc::clone(&calling);
            std::thread::spawn(move || {
                let one = requests(1);
                let request = request(b"tp-ada", "m2.7", &one, T0, None);
                let mut counts = (0u32, 0u32);
                loop {
                    match consume(&handle, &request) {
                        Ok(_) => counts.0 += 1,
                        Err(tally_status::TALLY_CLOSED) => counts.1 += 1,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                    if counts.0 + counts.1 == 1 {
                        calling.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    if counts.1 > 10 {
                        return counts;
                    }
                }
            })
        })
        .collect();
    // (A thread that ended, by a panic, is not waited for: its join below reports it.)
    while calling.load(std::sync::atomic::Ordering::SeqCst) < threads.len()
        && !threads.iter().any(|thread| thread.is_finished())
    {
        std::thread::yield_now();
    }
    assert_eq!(tally_engine_close(handle.0), tally_status::TALLY_OK);
    for thread in threads {
        let (ok, closed) = thread.join().expect("no panic");
        assert!(ok > 0 && closed > 10);
    }
}

/// Threads racing to consume under the same new request ids: each id is counted once, and
/// exactly one thread per id is told its decision is not a replay (`replayed` false), as the
/// header says; the others get that first decision back with `replayed` set.
#[test]
fn of_threads_racing_on_a_new_request_id_exactly_one_is_told_it_was_first() {
    const THREADS: usize = 4;
    const IDS: usize = 200;
    let handle = Arc::new(in_memory());
    user(&handle, "ada", "tp-ada", Some("Max"));
    let started = Arc::new(std::sync::Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let handle = Arc::clone(&handle);
            let started = Arc::clone(&started);
            std::thread::spawn(move || {
                let one = requests(1);
                started.wait();
                (0..IDS)
                    .map(|index| {
                        let id = format!("race-{index}");
                        let request = request(b"tp-ada", "m2.7", &one, T0, Some(id.as_bytes()));
                        let decision = consume(&handle, &request).expect("decided");
                        assert!(decision.admitted);
                        decision.replayed
                    })
                    .collect::<Vec<bool>>()
            })
        })
        .collect();
    let replays: Vec<Vec<bool>> = threads
        .into_iter()
        .map(|thread| thread.join().expect("no panic"))
        .collect();
    for index in 0..IDS {
        let first = replays.iter().filter(|thread| !thread[index]).count();
        assert_eq!(
            first, 1,
            "request id race-{index}: {first} threads told first"
        );
    }
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    let one = requests(1);
    let probe = request(b"tp-ada", "m2.7", &one, T0, None);
    assert_eq!(
        tally_engine_check(handle.0, &probe, decision.as_mut_ptr()),
        tally_status::TALLY_OK
    );
    // SAFETY: written on TALLY_OK.
    let decision = unsafe { decision.assume_init() };
    // A check answers the limit as its request would leave it: the ids' and its own.
    assert_eq!(
        decision.limits[0].used,
        IDS as u64 + 1,
        "each id counted once"
    );
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tally-ffi-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn open(dir: &std::path::Path) -> Result<Handle, tally_status> {
    let path = dir.to_str().unwrap_or_default();
    let (p, pl) = s(path);
    let mut engine = ptr::null_mut();
    let options = Unbounded::new();
    match tally_engine_open(p, pl, 0, ptr::null(), 0, 2, 0, options.0, &mut engine) {
        tally_status::TALLY_OK => Ok(Handle(engine)),
        status => Err(status),
    }
}

#[test]
fn calls_after_a_storage_error_say_the_log_failed_until_reopened() {
    let dir = temp_dir("faults");
    let faults = ::tally_engine::Faults::new();
    let options = ::tally_engine::OpenOptions {
        faults: Some(Arc::clone(&faults)),
        ..::tally_engine::OpenOptions::default()
    };
    let engine = ::tally_engine::Engine::open(
        &dir,
        ::tally_engine::Policy::token_plan(),
        Arc::new(::tally_engine::ManualClock::new(T0)),
        options,
    )
    .expect("opens");
    let handle = Handle(handle_from_engine(engine));
    user(&handle, "ada", "tp-ada", Some("Starter"));
    faults.fail_next_inserts(1);
    let one = requests(1);
    // The failed write fails the log: this call and every later change say so.
    for _ in 0..3 {
        let status = consume(&handle, &request(b"tp-ada", "m2.7", &one, T0, None)).err();
        assert_eq!(status, Some(tally_status::TALLY_LOG_FAILED));
        assert!(last_error().contains("reopen"));
    }
    let (t, tl) = s("@ada");
    let mut balance = 0;
    assert_eq!(
        tally_engine_top_up(handle.0, t, tl, 5, T0, &mut balance),
        tally_status::TALLY_LOG_FAILED
    );
    // Reads still answer.
    assert_eq!(
        tally_engine_credits(handle.0, t, tl, &mut balance),
        tally_status::TALLY_OK
    );
    let _ = tally_engine_close(handle.0);
    drop(handle);
    let reopened = open(&dir).expect("reopens");
    let decision = consume(&reopened, &request(b"tp-ada", "m2.7", &one, T0, None));
    assert!(decision.is_ok_and(|d| d.admitted));
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn opening_a_locked_foreign_damaged_or_newer_database_has_its_own_status() {
    let dir = temp_dir("open");
    let first = open(&dir).expect("opens");
    assert_eq!(open(&dir).err(), Some(tally_status::TALLY_DATABASE_LOCKED));
    assert_eq!(tally_engine_close(first.0), tally_status::TALLY_OK);
    drop(first);

    let foreign = temp_dir("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("notes.txt"), "not tally").expect("write");
    assert_eq!(
        open(&foreign).err(),
        Some(tally_status::TALLY_DATABASE_FOREIGN)
    );
    let file = foreign.join("notes.txt");
    assert_eq!(
        open(&file).err(),
        Some(tally_status::TALLY_DATABASE_FOREIGN)
    );

    // A newer format: the meta tree says a format version this build does not read.
    {
        let db = sled::open(&dir).expect("sled opens");
        let meta = db.open_tree("meta").expect("meta");
        meta.insert("format_version", &999u16.to_le_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        open(&dir).err(),
        Some(tally_status::TALLY_DATABASE_NEWER_FORMAT)
    );

    // Damaged: sled's files overwritten with garbage.
    let damaged = temp_dir("damaged");
    drop(open(&damaged).expect("opens"));
    std::thread::sleep(std::time::Duration::from_millis(100));
    for entry in std::fs::read_dir(&damaged).expect("list").flatten() {
        if entry.path().is_file() {
            std::fs::write(entry.path(), vec![0xA5u8; 4096]).expect("overwrite");
        }
    }
    let status = open(&damaged).err();
    assert_eq!(
        status,
        Some(tally_status::TALLY_DATABASE_DAMAGED),
        "{}",
        last_error()
    );
    for dir in [dir, foreign, damaged] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn submit(handle: &Handle, request: &tally_request) -> Result<*mut tally_submission, tally_status> {
    let mut submission = ptr::null_mut();
    match tally_engine_submit(handle.0, request, &mut submission) {
        tally_status::TALLY_OK => Ok(submission),
        status => Err(status),
    }
}

fn complete(
    handle: &Handle,
    submission: *mut tally_submission,
) -> Result<tally_decision, tally_status> {
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    match tally_engine_complete(handle.0, submission, decision.as_mut_ptr()) {
        // SAFETY: written on TALLY_OK.
        tally_status::TALLY_OK => Ok(unsafe { decision.assume_init() }),
        status => Err(status),
    }
}

/// What remains of tp-ada's tightest limit now (a check answers what would remain after one
/// more request).
fn remaining(handle: &Handle) -> u64 {
    let one = requests(1);
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    let probe = request(b"tp-ada", "m2.7", &one, T0, None);
    assert_eq!(
        tally_engine_check(handle.0, &probe, decision.as_mut_ptr()),
        tally_status::TALLY_OK
    );
    // SAFETY: written on TALLY_OK.
    unsafe { decision.assume_init() }.remaining + 1
}

fn open_with_faults(dir: &std::path::Path) -> (Handle, Arc<::tally_engine::Faults>) {
    let faults = ::tally_engine::Faults::new();
    let options = ::tally_engine::OpenOptions {
        durability: ::tally_engine::Durability::Sync,
        faults: Some(Arc::clone(&faults)),
        ..::tally_engine::OpenOptions::default()
    };
    let engine = ::tally_engine::Engine::open(
        dir,
        ::tally_engine::Policy::token_plan(),
        Arc::new(::tally_engine::ManualClock::new(T0)),
        options,
    )
    .expect("opens");
    (Handle(handle_from_engine(engine)), faults)
}

#[test]
fn a_submission_whose_flush_fails_completes_with_log_failed_and_is_given_back() {
    let dir = temp_dir("submission-fails");
    let (handle, faults) = open_with_faults(&dir);
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let before = remaining(&handle);
    let one = requests(1);
    faults.hold_flushes();
    faults.fail_next_flushes(1);
    let plain = submit(&handle, &request(b"tp-ada", "m2.7", &one, T0, None));
    let with_id = submit(
        &handle,
        &request(b"tp-ada", "m2.7", &one, T0, Some(b"lost")),
    );
    let applied = remaining(&handle);
    // Released before any assertion, so a failing one does not leave the close waiting.
    faults.release_flushes();
    assert_eq!(applied, before - 2, "applied at submission");
    for submission in [plain, with_id] {
        let status = complete(&handle, submission.expect("submitted")).err();
        assert_eq!(
            status,
            Some(tally_status::TALLY_LOG_FAILED),
            "{}",
            last_error()
        );
    }
    assert_eq!(remaining(&handle), before, "both given back");
    let _ = tally_engine_close(handle.0);
    drop(handle);
    let reopened = open(&dir).expect("reopens");
    assert_eq!(remaining(&reopened), before, "nothing was logged");
    let replay = consume(
        &reopened,
        &request(b"tp-ada", "m2.7", &one, T0, Some(b"lost")),
    );
    assert!(
        replay.is_ok_and(|d| d.admitted && !d.replayed),
        "the id was forgotten"
    );
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A close that succeeded flushed every event the engine had queued: a submission completed
/// after it answers its decision (`TALLY_CLOSED` there read as "not admitted", and a retry
/// without a request id counted it twice). After a close that failed, `TALLY_CLOSED`.
#[test]
fn a_submission_completed_after_a_clean_close_answers_its_decision_the_close_made_durable() {
    let dir = temp_dir("submission-closed");
    let (handle, faults) = open_with_faults(&dir);
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let before = remaining(&handle);
    let one = requests(1);
    faults.hold_flushes();
    let submission = submit(
        &handle,
        &request(b"tp-ada", "m2.7", &one, T0, Some(b"kept")),
    );
    faults.release_flushes();
    let submission = submission.expect("submitted");
    assert_eq!(tally_engine_close(handle.0), tally_status::TALLY_OK);
    let decision = complete(&handle, submission).expect("the decision the close kept");
    assert!(decision.admitted && !decision.replayed);
    drop(handle);
    let reopened = open(&dir).expect("reopens");
    assert_eq!(remaining(&reopened), before - 1, "the close flushed it");
    let replay = consume(
        &reopened,
        &request(b"tp-ada", "m2.7", &one, T0, Some(b"kept")),
    );
    assert!(replay.is_ok_and(|d| d.admitted && d.replayed));
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);

    // A close whose flush fails: no answer the close could vouch for.
    let dir = temp_dir("submission-close-failed");
    let (handle, faults) = open_with_faults(&dir);
    user(&handle, "bo", "tp-bo", Some("Starter"));
    let submission =
        submit(&handle, &request(b"tp-bo", "m2.7", &one, T0, None)).expect("submitted");
    faults.fail_next_flushes(1);
    assert_ne!(tally_engine_close(handle.0), tally_status::TALLY_OK);
    assert_eq!(
        complete(&handle, submission).err(),
        Some(tally_status::TALLY_CLOSED)
    );
    drop(handle);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_stored_policy_source_is_for_open_only_and_takes_no_text() {
    let stored = tally_policy_source::TALLY_POLICY_STORED as u32;
    let mut engine = ptr::null_mut();
    assert_eq!(
        tally_engine_open_in_memory(stored, ptr::null(), 0, ptr::null(), &mut engine),
        tally_status::TALLY_INVALID_ARGUMENT
    );
    assert!(
        last_error().starts_with("policy_source: "),
        "{}",
        last_error()
    );
    assert!(engine.is_null());
    let handle = in_memory();
    assert_eq!(
        tally_engine_swap_policy(handle.0, stored, ptr::null(), 0, T0),
        tally_status::TALLY_INVALID_ARGUMENT
    );
    assert!(
        last_error().starts_with("policy_source: "),
        "{}",
        last_error()
    );

    let dir = temp_dir("stored-text");
    let (p, pl) = s(dir.to_str().unwrap_or_default());
    let (t, tl) = s("time_zone = \"UTC\"");
    assert_eq!(
        tally_engine_open(p, pl, stored, t, tl, 2, 0, ptr::null(), &mut engine),
        tally_status::TALLY_INVALID_ARGUMENT
    );
    assert!(
        last_error().contains("TALLY_POLICY_STORED"),
        "{}",
        last_error()
    );
    assert!(engine.is_null());
    assert!(!dir.exists(), "a refused open created the directory");
}

/// `tally_verify` of a closed database: its status, and whether it was sound.
fn verify(dir: &std::path::Path, options: *const tally_options) -> Result<bool, tally_status> {
    let (p, pl) = s(dir.to_str().unwrap_or_default());
    let mut sound = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut needed = 0;
    let buf_ptr = buf.as_mut_ptr().cast();
    match tally_verify(p, pl, options, &mut sound, buf_ptr, buf.len(), &mut needed) {
        tally_status::TALLY_OK => Ok(sound),
        status => Err(status),
    }
}

#[test]
fn verify_without_options_reads_the_recorded_ones_and_says_when_they_do_not_decode() {
    let dir = temp_dir("recorded");
    let handle = open(&dir).expect("opens");
    assert_eq!(tally_engine_close(handle.0), tally_status::TALLY_OK);
    drop(handle);
    assert_eq!(verify(&dir, ptr::null()), Ok(true));
    {
        let db = sled::open(&dir).expect("sled opens");
        let meta = db.open_tree("meta").expect("meta");
        meta.insert("options", "not JSON").expect("insert");
        db.flush().expect("flush");
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    // Reported as a problem: unsound, and the report says which.
    let (p, pl) = s(dir.to_str().unwrap_or_default());
    let mut sound = true;
    let mut buf = vec![0u8; 64 * 1024];
    let mut needed = 0;
    assert_eq!(
        tally_verify(
            p,
            pl,
            ptr::null(),
            &mut sound,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut needed
        ),
        tally_status::TALLY_OK
    );
    assert!(!sound);
    let report = String::from_utf8_lossy(&buf[..needed]).into_owned();
    assert!(report.contains("recorded options"), "{report}");
    // Options given explicitly do not read the record.
    let mut options = ptr::null_mut();
    assert_eq!(tally_options_new(&mut options), tally_status::TALLY_OK);
    assert_eq!(verify(&dir, options), Ok(true));
    tally_options_free(options);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A call that fails from a thread-exit destructor, after the thread's last-error storage is
/// gone (a C++ `thread_local` closing an engine, a `pthread_key` destructor): it returns its
/// status; it must not panic outside the boundary (which aborts the whole process).
#[test]
fn a_call_failing_from_a_thread_exit_destructor_returns_its_status() {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct FailsOnExit(Arc<AtomicI64>);
    impl Drop for FailsOnExit {
        fn drop(&mut self) {
            let mut engine = ptr::null_mut();
            // Durability 99 is no mode: an error, whose message has nowhere to go.
            let status = tally_engine_open_in_memory(99, ptr::null(), 0, ptr::null(), &mut engine);
            self.0.store(status as i64, Ordering::SeqCst);
        }
    }
    thread_local! {
        static ON_EXIT: RefCell<Option<FailsOnExit>> = const { RefCell::new(None) };
    }
    let seen = Arc::new(AtomicI64::new(-1));
    let recorded = Arc::clone(&seen);
    std::thread::spawn(move || {
        // Registered before the last-error storage, so destroyed after it.
        ON_EXIT.with(|on_exit| *on_exit.borrow_mut() = Some(FailsOnExit(recorded)));
        let mut engine = ptr::null_mut();
        let status = tally_engine_open_in_memory(99, ptr::null(), 0, ptr::null(), &mut engine);
        assert_ne!(status, tally_status::TALLY_OK);
        let mut needed = 0usize;
        assert_eq!(
            tally_last_error(ptr::null_mut(), 0, &mut needed),
            tally_status::TALLY_BUFFER_TOO_SMALL
        );
        assert!(needed > 1, "the message is kept while the thread lives");
    })
    .join()
    .expect("the thread ends");
    let status = seen.load(Ordering::SeqCst);
    assert_ne!(status, -1, "the destructor ran");
    assert_ne!(status, tally_status::TALLY_OK as i64);
}

/// A usage time past the end of tally's time range is a bad timestamp, as a request's `at_ms`
/// there is; usage after the adjustment's own time is a plain invalid argument.
#[test]
fn an_adjustment_of_usage_past_the_time_range_is_a_bad_timestamp() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Max"));
    let year_2100 = 4_102_444_800_000;
    let add = tally_adjustment_direction::TALLY_ADJUST_ADD as u32;
    let (status, _) = adjust_one_request_at(&handle, "tp-ada", add, year_2100, T0);
    assert_eq!(
        status,
        tally_status::TALLY_BAD_TIMESTAMP,
        "{}",
        last_error()
    );
    assert!(last_error().contains("usage_at_ms"), "{}", last_error());
    let (status, _) = adjust_one_request_at(&handle, "tp-ada", add, T0 + HOUR_MS, T0);
    assert_eq!(
        status,
        tally_status::TALLY_INVALID_ARGUMENT,
        "{}",
        last_error()
    );
    assert!(
        last_error().contains("before it happens"),
        "{}",
        last_error()
    );
}

/// What `tally_engine_adjust_usage`'s documentation promises for a correction that could move
/// nothing: a key without a seat, or a resource its plan does not limit, is
/// `TALLY_INVALID_ARGUMENT`; units none of the plan's limits on the resource count are a
/// problem with the quantities, `TALLY_BAD_QUANTITY` (the header said `INVALID_ARGUMENT`).
/// Nothing moves either way.
#[test]
fn a_correction_no_limit_counts_names_the_resource_or_the_quantities_by_status() {
    let policy = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
required = ["requests"]
[resources.speech]
units = ["characters"]
[plans.Tokens]
limits = [{ resource = "chat", unit = "tokens", amount = 1000, window = "daily" }]
"#;
    let options = Unbounded::new();
    let mut engine = ptr::null_mut();
    let (p, pl) = s(policy);
    assert_eq!(
        tally_engine_open_in_memory(
            tally_policy_source::TALLY_POLICY_TOML as u32,
            p,
            pl,
            options.0,
            &mut engine
        ),
        tally_status::TALLY_OK,
        "{}",
        last_error()
    );
    let handle = Handle(engine);
    user(&handle, "ada", "k-seated", Some("Tokens"));
    user(&handle, "bob", "k-unseated", None);
    let add = tally_adjustment_direction::TALLY_ADJUST_ADD as u32;
    let adjust = |key: &str, resource: &str, quantities: &[tally_quantity]| {
        let ((k, kl), (r, rl)) = (s(key), s(resource));
        // SAFETY: plain integers and char arrays, for which all-zero is a valid value.
        let mut adjustment: tally_adjustment = unsafe { std::mem::zeroed() };
        let status = tally_engine_adjust_usage(
            handle.0,
            k,
            kl,
            r,
            rl,
            quantities.as_ptr(),
            quantities.len(),
            T0,
            add,
            T0,
            &mut adjustment,
        );
        (status, last_error())
    };
    let characters = [tally_quantity {
        unit: tally_unit::TALLY_UNIT_CHARACTERS as u32,
        amount: 5,
    }];
    let (status, message) = adjust("k-unseated", "chat", &requests(1));
    assert_eq!(status, tally_status::TALLY_INVALID_ARGUMENT, "{message}");
    assert!(message.starts_with("key: "), "{message}");
    let (status, message) = adjust("k-seated", "speech", &characters);
    assert_eq!(status, tally_status::TALLY_INVALID_ARGUMENT, "{message}");
    assert!(message.starts_with("resource: "), "{message}");
    let (status, message) = adjust("k-seated", "chat", &requests(1));
    assert_eq!(status, tally_status::TALLY_BAD_QUANTITY, "{message}");
    assert!(message.starts_with("quantities: "), "{message}");
    let (k, kl) = s("k-seated");
    let mut needed = 0;
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        tally_engine_usage(
            handle.0,
            k,
            kl,
            T0,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut needed
        ),
        tally_status::TALLY_OK
    );
    let report = String::from_utf8_lossy(&buf[..needed - 1]).into_owned();
    assert!(report.contains(r#""used":0"#), "{report}");
}

/// What `tally_engine_refund` answers for an id with nothing to give back, as its comment
/// says: an id no request used (or one whose denial is not remembered: an unknown key) is
/// `TALLY_UNKNOWN_REQUEST`; an id whose remembered decision was a denial is
/// `TALLY_INVALID_ARGUMENT` naming `request_id`, as is a second refund. Nothing changes.
#[test]
fn a_refund_of_an_unknown_a_denied_or_a_refunded_request_id_has_its_status() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Max"));
    user(&handle, "bob", "tp-bob", None);
    let one = requests(1);
    let refund = |id: &str| {
        let (r, rl) = s(id);
        let status = tally_engine_refund(handle.0, r, rl, T0);
        (status, last_error())
    };
    let denied = consume(
        &handle,
        &request(b"tp-bob", "m2.7", &one, T0, Some(b"denied")),
    )
    .expect("decided");
    assert_eq!(
        denied.denial,
        tally_denial::TALLY_DENIAL_NO_RESOURCES as u32
    );
    let unknown_key = consume(
        &handle,
        &request(b"nobody", "m2.7", &one, T0, Some(b"nokey")),
    )
    .expect("decided");
    assert_eq!(
        unknown_key.denial,
        tally_denial::TALLY_DENIAL_UNKNOWN_KEY as u32
    );
    let admitted = consume(
        &handle,
        &request(b"tp-ada", "m2.7", &one, T0, Some(b"admitted")),
    )
    .expect("decided");
    assert!(admitted.admitted);

    for never in ["never-used", "nokey"] {
        let (status, message) = refund(never);
        assert_eq!(
            status,
            tally_status::TALLY_UNKNOWN_REQUEST,
            "{never}: {message}"
        );
    }
    let (status, message) = refund("denied");
    assert_eq!(status, tally_status::TALLY_INVALID_ARGUMENT, "{message}");
    assert!(
        message.starts_with("request_id: ") && message.contains("denied"),
        "{message}"
    );
    assert_eq!(refund("admitted").0, tally_status::TALLY_OK);
    let (status, message) = refund("admitted");
    assert_eq!(status, tally_status::TALLY_INVALID_ARGUMENT, "{message}");
    assert!(message.contains("already refunded"), "{message}");
}

/// As `tally_request.request_id` says: a request whose key the engine does not know is denied
/// `TALLY_DENIAL_UNKNOWN_KEY` (a gateway's 401) whatever its id, even stamped before the
/// request-id horizon, where a known key's new id is `TALLY_BAD_TIMESTAMP`.
#[test]
fn an_unknown_keys_request_with_a_stale_request_id_is_denied_not_refused() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Max"));
    let one = requests(1);
    let stale = T0 - 40 * 24 * HOUR_MS;
    let unknown = consume(
        &handle,
        &request(b"nobody", "m2.7", &one, stale, Some(b"old")),
    );
    let unknown = unknown.expect("decided");
    assert_eq!(
        unknown.denial,
        tally_denial::TALLY_DENIAL_UNKNOWN_KEY as u32
    );
    let known = consume(
        &handle,
        &request(b"tp-ada", "m2.7", &one, stale, Some(b"old")),
    );
    assert_eq!(
        known.err(),
        Some(tally_status::TALLY_BAD_TIMESTAMP),
        "{}",
        last_error()
    );
}

/// Reserves one m2.7 request for `key` at T0: the reservation's id.
fn reserve_one_request(handle: &Handle, key: &[u8]) -> u64 {
    let one = requests(1);
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    let mut reservation = 0;
    assert_eq!(
        tally_engine_reserve(
            handle.0,
            &request(key, "m2.7", &one, T0, None),
            0,
            decision.as_mut_ptr(),
            &mut reservation,
        ),
        tally_status::TALLY_OK
    );
    assert_ne!(reservation, 0, "admitted");
    reservation
}

#[test]
fn a_settles_bad_quantities_are_named_by_its_argument_actual() {
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let reservation = reserve_one_request(&handle, b"tp-ada");
    let unit = |unit: tally_unit, amount| tally_quantity {
        unit: unit as u32,
        amount,
    };
    use tally_unit::*;
    let eight = [unit(TALLY_UNIT_REQUESTS, 1); 8];
    let cases: [(&[tally_quantity], tally_status); 5] = [
        (
            &[unit(TALLY_UNIT_REQUESTS, 0)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (
            &[unit(TALLY_UNIT_REQUESTS, (1 << 40) + 1)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (
            &[unit(TALLY_UNIT_REQUESTS, 1), unit(TALLY_UNIT_REQUESTS, 1)],
            tally_status::TALLY_BAD_QUANTITY,
        ),
        (&eight, tally_status::TALLY_BAD_QUANTITY),
        (
            &[tally_quantity { unit: 7, amount: 1 }],
            tally_status::TALLY_BAD_ENUM,
        ),
    ];
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    for (actual, status) in cases {
        assert_eq!(
            tally_engine_settle(
                handle.0,
                reservation,
                actual.as_ptr(),
                actual.len(),
                T0,
                decision.as_mut_ptr(),
            ),
            status,
            "{actual:?}"
        );
        let message = last_error();
        assert!(message.starts_with("actual: "), "{actual:?}: {message}");
    }
    assert_eq!(
        tally_engine_settle(
            handle.0,
            reservation,
            ptr::null(),
            2,
            T0,
            decision.as_mut_ptr()
        ),
        tally_status::TALLY_NULL_POINTER
    );
    assert!(last_error().starts_with("actual: "), "{}", last_error());
    // The reservation is still open: a good settle goes through.
    let one = requests(1);
    assert_eq!(
        tally_engine_settle(
            handle.0,
            reservation,
            one.as_ptr(),
            1,
            T0,
            decision.as_mut_ptr()
        ),
        tally_status::TALLY_OK
    );
}

#[test]
fn a_null_request_is_named_plainly_by_every_call_that_takes_one() {
    let handle = in_memory();
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    let mut reservation = 0;
    let mut submission = ptr::null_mut();
    let (decision_out, reservation_out, submission_out) = (
        decision.as_mut_ptr(),
        ptr::addr_of_mut!(reservation),
        ptr::addr_of_mut!(submission),
    );
    let calls: [(&str, &dyn Fn() -> tally_status); 4] = [
        ("consume", &|| {
            tally_engine_consume(handle.0, ptr::null(), decision_out)
        }),
        ("check", &|| {
            tally_engine_check(handle.0, ptr::null(), decision_out)
        }),
        ("reserve", &|| {
            tally_engine_reserve(handle.0, ptr::null(), 0, decision_out, reservation_out)
        }),
        ("submit", &|| {
            tally_engine_submit(handle.0, ptr::null(), submission_out)
        }),
    ];
    for (name, call) in calls {
        assert_eq!(call(), tally_status::TALLY_NULL_POINTER, "{name}");
        assert_eq!(last_error(), "request: is NULL", "{name}");
    }
    assert!(submission.is_null());
}

/// `tally_engine_consume_many`'s array is `requests` and its length the argument `count`: the
/// NULL array's message names `count`, not "a length" no argument holds.
#[test]
fn consume_many_with_a_null_array_names_its_count() {
    let handle = in_memory();
    let mut statuses = [tally_status::TALLY_OK; 2];
    // SAFETY: plain integers and char arrays, for which all-zero is a valid value.
    let mut decisions: [tally_decision; 2] = unsafe { std::mem::zeroed() };
    let status = tally_engine_consume_many(
        handle.0,
        ptr::null(),
        2,
        statuses.as_mut_ptr(),
        decisions.as_mut_ptr(),
    );
    assert_eq!(status, tally_status::TALLY_NULL_POINTER);
    assert_eq!(last_error(), "requests: is NULL with a count of 2");
}

#[test]
fn opens_durability_errors_name_durability_mode_and_interval_ms() {
    let dir = temp_dir("durability-names");
    let path = dir.to_str().unwrap_or_default();
    let (p, pl) = s(path);
    let mut engine = ptr::null_mut();
    let interval = tally_durability::TALLY_DURABILITY_INTERVAL as u32;
    for interval_ms in [0, 60_001] {
        assert_eq!(
            tally_engine_open(
                p,
                pl,
                0,
                ptr::null(),
                0,
                interval,
                interval_ms,
                ptr::null(),
                &mut engine
            ),
            tally_status::TALLY_INVALID_ARGUMENT
        );
        assert!(
            last_error().starts_with("interval_ms: "),
            "{}",
            last_error()
        );
    }
    assert_eq!(
        tally_engine_open(p, pl, 0, ptr::null(), 0, 9, 100, ptr::null(), &mut engine),
        tally_status::TALLY_BAD_ENUM
    );
    assert!(
        last_error().starts_with("durability_mode: "),
        "{}",
        last_error()
    );
    assert!(engine.is_null());
    assert!(!dir.exists(), "a refused open created the directory");
}

#[test]
fn an_events_after_past_the_log_names_after_seq() {
    let dir = temp_dir("after-seq");
    let handle = open(&dir).expect("opens");
    user(&handle, "ada", "tp-ada", None);
    let mut needed = 0;
    assert_eq!(
        tally_engine_events_after(handle.0, 1_000, 10, ptr::null_mut(), 0, &mut needed),
        tally_status::TALLY_INVALID_ARGUMENT
    );
    assert!(last_error().starts_with("after_seq: "), "{}", last_error());
    drop(handle);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reserves one m2.7 request for `key` at T0 with a lease of `lease_ms`: the reservation's id.
fn reserve_one_request_for(handle: &Handle, key: &[u8], lease_ms: u64) -> u64 {
    let one = requests(1);
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    let mut reservation = 0;
    assert_eq!(
        tally_engine_reserve(
            handle.0,
            &request(key, "m2.7", &one, T0, None),
            lease_ms,
            decision.as_mut_ptr(),
            &mut reservation,
        ),
        tally_status::TALLY_OK
    );
    assert_ne!(reservation, 0, "admitted");
    reservation
}

/// Settles `reservation` at `at_ms` with `amount` requests: the status.
fn settle_requests(handle: &Handle, reservation: u64, amount: u64, at_ms: u64) -> tally_status {
    let actual = requests(amount);
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    tally_engine_settle(
        handle.0,
        reservation,
        actual.as_ptr(),
        actual.len(),
        at_ms,
        decision.as_mut_ptr(),
    )
}

#[test]
fn a_reservation_whose_lease_ended_is_expired_and_one_settled_or_voided_is_closed() {
    use tally_status::*;
    let handle = in_memory();
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let lease_ms = 60_000;
    let [settled, voided, swept] =
        [(); 3].map(|()| reserve_one_request_for(&handle, b"tp-ada", lease_ms));
    assert_eq!(settle_requests(&handle, settled, 1, T0 + 1), TALLY_OK);
    assert_eq!(tally_engine_void(handle.0, voided, T0 + 1), TALLY_OK);
    let mut count = 0;
    assert_eq!(
        tally_engine_expire_reservations(handle.0, T0 + lease_ms, &mut count),
        TALLY_OK
    );
    assert_eq!(count, 1, "swept");
    let late = T0 + 2 * lease_ms;
    // Settled (with other amounts) or voided: closed, as before.
    assert_eq!(
        settle_requests(&handle, settled, 2, late),
        TALLY_RESERVATION_CLOSED
    );
    assert!(
        last_error().ends_with("already settled"),
        "{}",
        last_error()
    );
    assert_eq!(
        settle_requests(&handle, voided, 1, late),
        TALLY_RESERVATION_CLOSED
    );
    assert!(last_error().ends_with("already voided"), "{}", last_error());
    // Expired by a sweep, then settled: expired, and so again.
    for _ in 0..2 {
        assert_eq!(
            settle_requests(&handle, swept, 1, late),
            TALLY_RESERVATION_EXPIRED
        );
        assert!(
            last_error().ends_with("already expired"),
            "{}",
            last_error()
        );
    }
    // A settle stamped when the lease has ended expires the reservation itself: expired too.
    let ending = reserve_one_request_for(&handle, b"tp-ada", lease_ms);
    assert_eq!(
        settle_requests(&handle, ending, 1, T0 + lease_ms),
        TALLY_RESERVATION_EXPIRED
    );
    assert_eq!(
        settle_requests(&handle, ending, 1, late),
        TALLY_RESERVATION_EXPIRED
    );
    // Voiding: a settled one is closed; a voided or expired one is a no-op.
    assert_eq!(
        tally_engine_void(handle.0, settled, late),
        TALLY_RESERVATION_CLOSED
    );
    assert_eq!(tally_engine_void(handle.0, voided, late), TALLY_OK);
    assert_eq!(tally_engine_void(handle.0, swept, late), TALLY_OK);
    assert_eq!(tally_engine_void(handle.0, ending, late), TALLY_OK);
    // The new code comes after every older one, which keep theirs.
    assert_eq!(TALLY_RESERVATION_CLOSED as u32, 26);
    assert_eq!(TALLY_RESERVATION_EXPIRED as u32, 36);
}

/// Options freed when dropped, with the engine's own clock at `start_ms` (0: the system
/// clock) and the default bound ahead of it (a day).
struct Clocked(*mut tally_options);

impl Clocked {
    fn new(start_ms: u64) -> Clocked {
        let mut options = ptr::null_mut();
        assert_eq!(tally_options_new(&mut options), tally_status::TALLY_OK);
        assert_eq!(
            tally_options_set_manual_clock(options, start_ms),
            tally_status::TALLY_OK
        );
        Clocked(options)
    }
}

impl Drop for Clocked {
    fn drop(&mut self) {
        tally_options_free(self.0);
    }
}

fn clock(handle: &Handle) -> u64 {
    let mut now_ms = 0;
    assert_eq!(
        tally_engine_clock(handle.0, &mut now_ms),
        tally_status::TALLY_OK
    );
    now_ms
}

/// With `tally_options_set_manual_clock` an engine reads a clock of its own, which only
/// `tally_engine_set_clock` moves: `TALLY_NOW`, the bound on stamps ahead of the clock and the
/// request-id horizon all follow it, in memory and on a database.
#[test]
fn an_engine_with_a_clock_of_its_own_reads_the_time_it_was_set_to() {
    const DAY_MS: u64 = 24 * HOUR_MS;
    let options = Clocked::new(T0);
    let dir = temp_dir("manual-clock");
    let path = dir.to_str().unwrap_or_default().to_owned();
    let (p, pl) = s(&path);
    let mut in_memory = ptr::null_mut();
    let mut on_disk = ptr::null_mut();
    assert_eq!(
        tally_engine_open_in_memory(0, ptr::null(), 0, options.0, &mut in_memory),
        tally_status::TALLY_OK
    );
    assert_eq!(
        tally_engine_open(p, pl, 0, ptr::null(), 0, 2, 0, options.0, &mut on_disk),
        tally_status::TALLY_OK
    );
    // Each engine has a clock of its own, and the options are not tied to either.
    drop(options);
    for handle in [Handle(in_memory), Handle(on_disk)] {
        assert_eq!(clock(&handle), T0);
        // TALLY_NOW is the clock's time: the user is created at T0 (2030), which the default
        // bound would refuse from the system clock.
        let ((u, ul), (k, kl)) = (s("ada"), s("tp-ada"));
        assert_eq!(
            tally_engine_create_user(handle.0, u, ul, k, kl, TALLY_NOW),
            tally_status::TALLY_OK
        );
        let ((t, tl), (plan, pl)) = (s("@ada"), s("Max"));
        assert_eq!(
            tally_engine_assign_seat(handle.0, t, tl, u, ul, plan, pl, T0),
            tally_status::TALLY_OK
        );
        let one = requests(1);
        // Two days ahead of the clock is refused until the clock moves there.
        let ahead = request(b"tp-ada", "m2.7", &one, T0 + 2 * DAY_MS, None);
        assert_eq!(
            consume(&handle, &ahead).err(),
            Some(tally_status::TALLY_BAD_TIMESTAMP)
        );
        assert!(
            last_error().contains("max_ahead_of_clock_ms"),
            "{}",
            last_error()
        );
        assert_eq!(
            tally_engine_set_clock(handle.0, T0 + 2 * DAY_MS),
            tally_status::TALLY_OK
        );
        assert_eq!(clock(&handle), T0 + 2 * DAY_MS);
        assert!(consume(&handle, &ahead).is_ok_and(|decision| decision.admitted));
        // A request id stamped at T0 is remembered from the clock's time on: taken now, its
        // retry once the clock is past every horizon is refused (it could not be recognised),
        // and still refused with the clock moved back (ids were forgotten by the later clock).
        let first = request(b"tp-ada", "m2.7", &one, T0, Some(b"req-1"));
        assert!(consume(&handle, &first).is_ok_and(|decision| decision.admitted));
        assert_eq!(
            tally_engine_set_clock(handle.0, T0 + 400 * DAY_MS),
            tally_status::TALLY_OK
        );
        assert_eq!(
            consume(&handle, &first).err(),
            Some(tally_status::TALLY_BAD_TIMESTAMP)
        );
        assert!(
            last_error().contains("before the engine's clock"),
            "{}",
            last_error()
        );
        assert_eq!(tally_engine_set_clock(handle.0, T0), tally_status::TALLY_OK);
        assert_eq!(
            consume(&handle, &first).err(),
            Some(tally_status::TALLY_BAD_TIMESTAMP)
        );
        assert!(
            last_error().contains("already forgotten"),
            "{}",
            last_error()
        );
        // Times outside tally's range are refused by name, and leave the clock where it was.
        for bad in [0, ::tally_engine::calendar::MAX_TIMESTAMP_MS, u64::MAX] {
            assert_eq!(
                tally_engine_set_clock(handle.0, bad),
                tally_status::TALLY_INVALID_ARGUMENT
            );
            assert!(last_error().starts_with("now_ms: "), "{}", last_error());
            assert_eq!(clock(&handle), T0);
        }
        assert_eq!(tally_engine_close(handle.0), tally_status::TALLY_OK);
        assert_eq!(
            tally_engine_set_clock(handle.0, T0),
            tally_status::TALLY_CLOSED
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The system clock is the default, and 0 restores it; only an engine's own clock can be set,
/// and a start outside tally's range is refused by name, leaving the options as they were.
#[test]
fn only_a_clock_of_the_engines_own_can_be_set() {
    let system_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64
    };
    let options = Clocked::new(T0);
    for bad in [::tally_engine::calendar::MAX_TIMESTAMP_MS, u64::MAX] {
        assert_eq!(
            tally_options_set_manual_clock(options.0, bad),
            tally_status::TALLY_INVALID_ARGUMENT
        );
        assert!(
            last_error().starts_with("manual_clock_ms: "),
            "{}",
            last_error()
        );
    }
    assert_eq!(
        tally_options_set_manual_clock(ptr::null_mut(), T0),
        tally_status::TALLY_NULL_POINTER
    );
    let mut engine = ptr::null_mut();
    assert_eq!(
        tally_engine_open_in_memory(0, ptr::null(), 0, options.0, &mut engine),
        tally_status::TALLY_OK
    );
    assert_eq!(clock(&Handle(engine)), T0, "a refused start left T0");
    for options in [Clocked::new(0), {
        let options = Clocked::new(T0);
        assert_eq!(
            tally_options_set_manual_clock(options.0, 0),
            tally_status::TALLY_OK
        );
        options
    }] {
        let mut engine = ptr::null_mut();
        assert_eq!(
            tally_engine_open_in_memory(0, ptr::null(), 0, options.0, &mut engine),
            tally_status::TALLY_OK
        );
        let handle = Handle(engine);
        let before = system_now();
        let now = clock(&handle);
        assert!(before <= now && now <= system_now(), "{before} {now}");
        assert_eq!(
            tally_engine_set_clock(handle.0, T0),
            tally_status::TALLY_INVALID_ARGUMENT
        );
        assert!(last_error().starts_with("engine: "), "{}", last_error());
        assert!(
            last_error().contains("tally_options_set_manual_clock"),
            "{}",
            last_error()
        );
    }
    let mut now_ms = 7;
    assert_eq!(
        tally_engine_clock(ptr::null(), &mut now_ms),
        tally_status::TALLY_NULL_POINTER
    );
    assert_eq!(now_ms, 7);
    assert_eq!(
        tally_engine_set_clock(ptr::null(), T0),
        tally_status::TALLY_NULL_POINTER
    );
}

/// The cursor calls take the cursor's name as the argument `name`: a name the engine refuses
/// (here for a control character, which the boundary's own checks let through) is named by
/// that argument, not by the engine's word for it ("cursor").
#[test]
fn a_cursor_name_the_engine_refuses_is_named_by_its_argument_name() {
    let dir = temp_dir("cursor-name");
    let handle = open(&dir).expect("opens");
    let (n, nl) = s("billing\nexport");
    let mut seq = 7;
    let mut existed = true;
    let (seq_out, existed_out) = (ptr::addr_of_mut!(seq), ptr::addr_of_mut!(existed));
    let calls: [(&str, &dyn Fn() -> tally_status); 3] = [
        ("cursor", &|| tally_engine_cursor(handle.0, n, nl, seq_out)),
        ("save_cursor", &|| {
            tally_engine_save_cursor(handle.0, n, nl, 0)
        }),
        ("delete_cursor", &|| {
            tally_engine_delete_cursor(handle.0, n, nl, existed_out)
        }),
    ];
    for (call, run) in calls {
        assert_eq!(run(), tally_status::TALLY_INVALID_ARGUMENT, "{call}");
        assert!(
            last_error().starts_with("name: "),
            "{call}: {}",
            last_error()
        );
    }
    assert_eq!((seq, existed), (7, true), "nothing written");
    drop(handle);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A policy whose meter weighs a token 2^40: the largest quantity of tokens overflows its
/// weighted sum.
const HEAVY_TOKENS_POLICY: &str = r#"time_zone = "UTC"
[resources."m2.7"]
units = ["requests", "tokens"]
required = ["requests"]
price_micros = { requests = 1 }
[meters.heavy]
terms = [{ resource = "m2.7", unit = "requests", weight = 1 }, { resource = "m2.7", unit = "tokens", weight = 1099511627776 }]
[plans.Starter]
limits = [{ meter = "heavy", amount = 1000, window = "rolling:5h" }]
"#;

/// A settle's quantities are its argument `actual`: one whose weighted sum overflows is
/// `TALLY_OVERFLOW` naming `actual`, as its other bad quantities are, not the engine's
/// `quantities`; and the reservation stays open.
#[test]
fn a_settles_overflowing_quantities_are_named_by_its_argument_actual() {
    let options = Unbounded::new();
    let mut engine = ptr::null_mut();
    let (policy, policy_len) = s(HEAVY_TOKENS_POLICY);
    assert_eq!(
        tally_engine_open_in_memory(
            tally_policy_source::TALLY_POLICY_TOML as u32,
            policy,
            policy_len,
            options.0,
            &mut engine
        ),
        tally_status::TALLY_OK,
        "{}",
        last_error()
    );
    let handle = Handle(engine);
    user(&handle, "ada", "tp-ada", Some("Starter"));
    let reservation = reserve_one_request(&handle, b"tp-ada");
    let overflowing = [
        tally_quantity {
            unit: tally_unit::TALLY_UNIT_REQUESTS as u32,
            amount: 1,
        },
        tally_quantity {
            unit: tally_unit::TALLY_UNIT_TOKENS as u32,
            amount: TALLY_MAX_QUANTITY,
        },
    ];
    let mut decision = std::mem::MaybeUninit::<tally_decision>::uninit();
    assert_eq!(
        tally_engine_settle(
            handle.0,
            reservation,
            overflowing.as_ptr(),
            overflowing.len(),
            T0,
            decision.as_mut_ptr()
        ),
        tally_status::TALLY_OVERFLOW
    );
    assert!(last_error().starts_with("actual: "), "{}", last_error());
    assert_eq!(
        settle_requests(&handle, reservation, 1, T0),
        tally_status::TALLY_OK
    );
}

/// The last error is the calling thread's: two threads fail at once with different errors, and
/// each reads its own message, whatever the other did meanwhile; a call that succeeds after
/// leaves it, and so does a size query with no buffer, a short one, or a NULL `needed`.
#[test]
fn each_thread_reads_the_last_error_of_its_own_failed_call() {
    let handle = Arc::new(in_memory());
    let both_failed = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = [("team", 129usize), ("key", 0usize)]
        .into_iter()
        .map(|(field, len)| {
            let (handle, both_failed) = (Arc::clone(&handle), Arc::clone(&both_failed));
            std::thread::spawn(move || {
                let text = "t".repeat(len);
                let (p, l) = s(&text);
                let status = if field == "team" {
                    tally_engine_create_team(handle.0, p, l, T0)
                } else {
                    let (u, ul) = s("ada");
                    tally_engine_create_user(handle.0, u, ul, p, l, T0)
                };
                // Both have failed before either reads.
                both_failed.wait();
                let message = last_error();
                // A call that succeeds leaves it as it was.
                let ok_team = format!("ok-{field}");
                let (team, team_len) = s(&ok_team);
                assert_eq!(
                    tally_engine_create_team(handle.0, team, team_len, T0),
                    tally_status::TALLY_OK
                );
                // So do failed size queries of the message itself.
                let mut needed = 0;
                let mut short = [0x55 as c_char; 4];
                assert_eq!(
                    tally_last_error(short.as_mut_ptr(), short.len(), &mut needed),
                    tally_status::TALLY_BUFFER_TOO_SMALL
                );
                assert_eq!(needed, message.len() + 1);
                assert!(short.iter().all(|&byte| byte == 0x55), "nothing copied");
                assert_eq!(
                    tally_last_error(short.as_mut_ptr(), short.len(), ptr::null_mut()),
                    tally_status::TALLY_NULL_POINTER
                );
                (status, message, last_error())
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|thread| thread.join().expect("no panic"))
        .collect();
    assert_eq!(results[0].0, tally_status::TALLY_STRING_TOO_LONG);
    assert_eq!(results[0].1, "team: is 129 bytes; at most 128");
    assert_eq!(results[1].0, tally_status::TALLY_EMPTY_STRING);
    assert_eq!(results[1].1, "key: must not be empty");
    for (_, message, after) in &results {
        assert_eq!(after, message, "a later success or size query changed it");
    }
    // A thread that never failed reads "" (needed 1), not another thread's message.
    let fresh = std::thread::spawn(|| {
        let mut needed = 0;
        let mut buf = [0x55 as c_char; 8];
        let status = tally_last_error(buf.as_mut_ptr(), buf.len(), &mut needed);
        (status, needed, buf[0])
    })
    .join()
    .expect("no panic");
    assert_eq!(fresh, (tally_status::TALLY_OK, 1, 0));
}
