//! Arbitrary text as a policy document (TOML and JSON): loading never panics, and a document that
//! loads round-trips through JSON to the same document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_engine::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for parsed in [Policy::from_toml_str(text), Policy::from_json_str(text)] {
        if let Ok(policy) = parsed {
            let json = serde_json_round_trip(&policy);
            let again = Policy::from_json_str(&json).expect("a loaded policy reloads from its JSON");
            assert_eq!(again.document(), policy.document());
        }
    }
});

fn serde_json_round_trip(policy: &Policy) -> String {
    // The engine's own JSON form of a policy, as written into the event log.
    tally_engine::policy_json(policy)
}
