//! Policy documents (TOML and JSON), two ways from each input:
//! - the input as text, loaded as TOML and as JSON;
//! - the shipped policy's JSON with a few of its fields changed by the input (each 3 bytes: what
//!   to do, then which node of the document), so that most inputs reach the compiler's checks
//!   rather than stop at the parser.
//!
//! Either way: loading never panics; a refused document names the field at fault and the
//! problem (neither empty); a loaded one round-trips through the engine's JSON and through its
//! TOML to the same document, and its JSON is a fixed point (the JSON of the reloaded policy is
//! the same text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;
use tally_engine::{Policy, PolicyError};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(Policy::from_toml_str(text), "toml");
        check(Policy::from_json_str(text), "json");
    }
    let mutated = mutate(data);
    check(Policy::from_json_str(&mutated), "mutated json");
});

fn check(parsed: Result<Policy, PolicyError>, what: &str) {
    let policy = match parsed {
        Ok(policy) => policy,
        Err(error) => {
            // The field as the document spelt it: an unknown key of spaces (or none, `""`) is
            // named as written, and its problem quotes it (CI's fuzzing found `" "`).
            assert!(
                !error.field.trim().is_empty() || error.problem.starts_with("unknown field"),
                "{what}: a refusal names no field: {error:?}"
            );
            assert!(
                !error.problem.trim().is_empty(),
                "{what}: a refusal names no problem: {error:?}"
            );
            return;
        }
    };
    let json = tally_engine::policy_json(&policy);
    let again = Policy::from_json_str(&json)
        .unwrap_or_else(|error| panic!("{what}: a loaded policy reloads from its JSON: {error}"));
    assert_eq!(
        again.document(),
        policy.document(),
        "{what}: JSON round trip"
    );
    assert_eq!(
        tally_engine::policy_json(&again),
        json,
        "{what}: the JSON of the reloaded policy differs"
    );
    let toml = policy
        .to_toml_string()
        .unwrap_or_else(|error| panic!("{what}: a loaded policy writes as TOML: {error}"));
    let from_toml = Policy::from_toml_str(&toml).unwrap_or_else(|error| {
        panic!("{what}: a loaded policy reloads from its TOML: {error}\n{toml}")
    });
    assert_eq!(
        from_toml.document(),
        policy.document(),
        "{what}: TOML round trip"
    );
}

fn shipped() -> &'static Value {
    static SHIPPED: OnceLock<Value> = OnceLock::new();
    SHIPPED.get_or_init(|| {
        serde_json::from_str(&tally_engine::policy_json(&Policy::token_plan()))
            .expect("the shipped policy's JSON")
    })
}

/// Every node of `value` as a JSON pointer, in document order.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let child_at = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                pointers(child, child_at, out);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{index}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// The shipped policy with up to 4 of its nodes changed: `[what, node hi, node lo]` each.
fn mutate(data: &[u8]) -> String {
    let mut document = shipped().clone();
    for op in data.chunks_exact(3).take(4) {
        let mut nodes = Vec::new();
        pointers(&document, String::new(), &mut nodes);
        let node = &nodes[usize::from(u16::from_be_bytes([op[1], op[2]])) % nodes.len()];
        let (parent, last) = match node.rsplit_once('/') {
            Some((parent, last)) => (
                parent.to_string(),
                last.replace("~1", "/").replace("~0", "~"),
            ),
            None => (String::new(), String::new()),
        };
        let replacement = match op[0] % 12 {
            0 => Value::Null,
            1 => Value::from(0),
            2 => Value::from(-1),
            3 => Value::from(u64::MAX),
            4 => Value::from(1u64 << 53),
            5 => Value::from(""),
            6 => Value::from("x"),
            7 => Value::from(true),
            8 => Value::Array(Vec::new()),
            9 => Value::Object(Default::default()),
            10 => {
                // Remove the node from its object or array.
                match document.pointer_mut(&parent) {
                    Some(Value::Object(map)) => drop(map.remove(&last)),
                    Some(Value::Array(items)) => {
                        if let Ok(index) = last.parse::<usize>() {
                            if index < items.len() {
                                items.remove(index);
                            }
                        }
                    }
                    _ => {}
                }
                continue;
            }
            _ => {
                // Duplicate the node into its array (a repeated entry), or copy a sibling's value.
                match document.pointer_mut(&parent) {
                    Some(Value::Array(items)) => {
                        if let Ok(index) = last.parse::<usize>() {
                            if let Some(item) = items.get(index).cloned() {
                                items.push(item);
                            }
                        }
                    }
                    Some(Value::Object(map)) => {
                        let first = map.values().next().cloned();
                        if let (Some(first), Some(slot)) = (first, map.get_mut(&last)) {
                            *slot = first;
                        }
                    }
                    _ => {}
                }
                continue;
            }
        };
        if let Some(slot) = document.pointer_mut(node) {
            *slot = replacement;
        }
    }
    document.to_string()
}
