//! What the operator commands print: a key's usage report, a decision, an event, a verify or
//! compact report — as text for a person and as JSON for a program. Pure functions of engine
//! values and the policy (for plan and limit names).

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tally_engine::event::{GivenBack, ReservationEnd};
use tally_engine::policy::CounterId;
use tally_engine::{
    Admission, ChargedTo, CompactReport, Decision, Denial, DenialReason, Event, EventBody, KeyKind,
    LimitReport, LimitStatus, PlanId, Policy, Quantities, UsageReport, VerifyReport,
};

use crate::format::{credits_exact, grouped, short_duration_rounded_up, utc_iso8601_ms};
use crate::outcome::{reason_index, DENIAL_REASONS};
use crate::report::{limit_label, limit_line};

/// A plan's name; a remembered decision's plan the policy no longer has (after a swap) says so.
fn plan_name(policy: &Policy, plan: PlanId) -> String {
    policy.plans().get(plan.index()).map_or_else(
        || "a plan the policy no longer has".to_string(),
        |plan| plan.name.to_string(),
    )
}

/// A resource's name, as `plan_name` is.
fn resource_name(policy: &Policy, resource: tally_engine::ResourceId) -> String {
    policy.resources().get(resource.index()).map_or_else(
        || "a resource the policy no longer has".to_string(),
        |resource| resource.name.to_string(),
    )
}

/// Micro-credits, and the same amount in credits: exactly, not rounded to the cent (which
/// showed a charge of 1,000 micro-credits as 0.00 credits, and a shortfall as less than it is).
fn micro_credits(micros: u64) -> String {
    format!(
        "{} micro-credits ({} credits)",
        grouped(micros),
        credits_exact(micros)
    )
}

/// The limits a decision touched, in the words of a usage report.
fn limit_reports(
    policy: &Policy,
    plan: Option<PlanId>,
    statuses: &[LimitStatus],
) -> Vec<LimitReport> {
    let Some(plan) = plan.and_then(|plan| policy.plans().get(plan.index())) else {
        return Vec::new();
    };
    statuses
        .iter()
        .filter_map(|status| {
            let limit = plan.limits.get(usize::from(status.limit))?;
            Some(LimitReport {
                name: limit.name.to_string(),
                meter: policy.meter(limit.meter).name.to_string(),
                window: limit.window,
                amount: status.amount,
                used: status.used,
                remaining: status.remaining(),
                reset_at_ms: status.reset_at_ms,
            })
        })
        .collect()
}

/// The engine's JSON of a limit, plus its reset time in ISO 8601 for people reading it.
fn limit_json(limit: &LimitReport) -> Value {
    let mut json = limit.to_json();
    json["reset_at"] = json!(limit.reset_at_ms.map(utc_iso8601_ms));
    json
}

// ---------------------------------------------------------------------------------------------
// Usage report.

pub fn usage_text(report: &UsageReport) -> String {
    let mut out = String::new();
    let seat = match (&report.kind, &report.plan) {
        (KeyKind::PayAsYouGo, _) => "a pay-as-you-go key".to_string(),
        (KeyKind::Plan, Some(plan)) => format!("seat on {plan}"),
        (KeyKind::Plan, None) => "no seat".to_string(),
    };
    let _ = writeln!(
        out,
        "key {}: user {}, team {}, {seat}; at {}",
        report.key,
        report.user,
        report.team,
        utc_iso8601_ms(report.at_ms)
    );
    if report.revoked {
        let _ = writeln!(out, "  revoked: every request on this key is denied");
    }
    for limit in &report.limits {
        limit_line(&mut out, limit, report.at_ms);
    }
    if report.kind == KeyKind::PayAsYouGo {
        let _ = writeln!(
            out,
            "  pay-as-you-go spent: {}",
            micro_credits(report.payg_micros)
        );
    } else {
        let _ = writeln!(
            out,
            "  credits of team {}: {} left; {} charged so far",
            report.team,
            micro_credits(report.credits_balance_micros),
            micro_credits(report.credits_charged_micros)
        );
    }
    if report.open_reservations > 0 {
        let _ = writeln!(out, "  open reservations: {}", report.open_reservations);
    }
    out
}

/// The engine's JSON of the report (the C ABI's too), plus ISO 8601 times.
pub fn usage_json(report: &UsageReport) -> Value {
    let mut json = report.to_json();
    json["at"] = json!(utc_iso8601_ms(report.at_ms));
    json["limits"] = json!(report.limits.iter().map(limit_json).collect::<Vec<Value>>());
    json
}

// ---------------------------------------------------------------------------------------------
// Decisions.

fn charged_to_words(policy: &Policy, charged_to: ChargedTo) -> String {
    match charged_to {
        ChargedTo::PlanQuota { plan } => {
            format!("from plan quota ({})", plan_name(policy, plan))
        }
        ChargedTo::Credits { micros } => {
            format!("charged to credits: {}", micro_credits(micros))
        }
        ChargedTo::PayAsYouGo { micros } => format!("pay-as-you-go: {}", micro_credits(micros)),
    }
}

fn charged_to_json(policy: &Policy, charged_to: ChargedTo) -> Value {
    match charged_to {
        ChargedTo::PlanQuota { plan } => {
            json!({"kind": "plan_quota", "plan": plan_name(policy, plan)})
        }
        ChargedTo::Credits { micros } => json!({"kind": "credits", "micros": micros}),
        ChargedTo::PayAsYouGo { micros } => json!({"kind": "pay_as_you_go", "micros": micros}),
    }
}

/// `now_ms`: the request's time, for the reset times of a denial's limits.
pub fn decision_text(policy: &Policy, decision: &Decision, now_ms: u64) -> String {
    match decision {
        Decision::Admitted(admission) => admission_text(policy, admission),
        Decision::Denied(denial) => denial_text(policy, denial, now_ms),
    }
}

fn admission_text(policy: &Policy, admission: &Admission) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "admitted: {}",
        charged_to_words(policy, admission.charged_to)
    );
    for limit in limit_reports(policy, admission.plan, admission.limits.as_slice()) {
        limit_line(&mut out, &limit, admission.at_ms);
    }
    if let Some(balance) = admission.credits_balance_micros {
        let _ = writeln!(out, "  team credits left: {}", micro_credits(balance));
    }
    out
}

/// The limit a denial names, as a label (`m2.7 requests / rolling:5h`).
fn denied_limit(policy: &Policy, denial: &Denial, limit: u8) -> String {
    let statuses: Vec<LimitStatus> = denial
        .limits
        .as_slice()
        .iter()
        .copied()
        .filter(|status| status.limit == limit)
        .collect();
    limit_reports(policy, denial.plan, &statuses)
        .first()
        .map_or_else(|| "a limit the plan no longer has".to_string(), limit_label)
}

/// The name of the limit a denial names, as its `limits` and the C ABI give it
/// (`m2.7:requests per rolling:5h`); `None` for one the plan no longer has.
fn denied_limit_name(policy: &Policy, denial: &Denial, limit: u8) -> Option<String> {
    let plan = policy.plans().get(denial.plan?.index())?;
    Some(plan.limits.get(usize::from(limit))?.name.to_string())
}

fn reason_words(policy: &Policy, denial: &Denial) -> String {
    match denial.reason {
        DenialReason::UnknownKey => "unknown key".into(),
        DenialReason::NoResources => "the key has no seat and its team no credits".into(),
        DenialReason::ResourceNotCovered { resource } => format!(
            "{} is not covered by {}, and its team's credits cannot pay for it",
            resource_name(policy, resource),
            // A key without a seat (or a pay-as-you-go key) has no plan of its own.
            if denial.plan.is_some() {
                "the key's plan"
            } else {
                "any plan the key holds"
            }
        ),
        DenialReason::OverRequestMaximum {
            unit,
            maximum,
            requested,
        } => format!(
            "over the per-request maximum: {} {unit} asked, at most {}",
            grouped(requested),
            grouped(maximum)
        ),
        DenialReason::QuotaExhausted {
            limit,
            retry_at_ms,
            retry_after_ms,
            ..
        } => format!(
            "quota exhausted on {}; retry in {} (at {})",
            denied_limit(policy, denial, limit),
            // Rounded up: a retry after the wait it names must not come too soon.
            short_duration_rounded_up(retry_after_ms),
            utc_iso8601_ms(retry_at_ms)
        ),
        DenialReason::ExceedsLimit {
            limit,
            amount,
            requested,
        } => format!(
            "the request ({}) is larger than the limit {} itself ({}): waiting cannot help",
            grouped(requested),
            denied_limit(policy, denial, limit),
            grouped(amount)
        ),
        DenialReason::InsufficientCredits {
            balance_micros,
            price_micros,
        } => format!(
            "insufficient credits: the request costs {}, the team holds {}",
            micro_credits(price_micros),
            micro_credits(balance_micros)
        ),
        DenialReason::TooManyReservations { open, maximum } => {
            format!("too many reservations: {open} open, at most {maximum}")
        }
        DenialReason::KeyRevoked => "the key was revoked".into(),
    }
}

fn denial_text(policy: &Policy, denial: &Denial, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "denied: {}", reason_words(policy, denial));
    for limit in limit_reports(policy, denial.plan, denial.limits.as_slice()) {
        limit_line(&mut out, &limit, now_ms);
    }
    if let Some(balance) = denial.credits_balance_micros {
        let _ = writeln!(out, "  team credits: {}", micro_credits(balance));
    }
    let remedies = remedy_words(policy, denial);
    if !remedies.is_empty() {
        let _ = writeln!(out, "  what would help: {}", remedies.join("; "));
    }
    out
}

fn remedy_words(policy: &Policy, denial: &Denial) -> Vec<String> {
    let remedies = &denial.remedies;
    let mut words = Vec::new();
    if let Some(micros) = remedies.credits_needed_micros {
        words.push(format!(
            "{} more in the team's credits",
            micro_credits(micros)
        ));
    }
    if let Some(plan) = remedies.upgrade_to {
        words.push(format!("a seat on {}", plan_name(policy, plan)));
    }
    if let Some(at_ms) = remedies.wait_until_ms {
        words.push(format!("waiting until {}", utc_iso8601_ms(at_ms)));
    }
    words
}

pub fn decision_json(policy: &Policy, decision: &Decision) -> Value {
    match decision {
        Decision::Admitted(admission) => json!({
            "decision": "admitted",
            "charged_to": charged_to_json(policy, admission.charged_to),
            "at_ms": admission.at_ms,
            "plan": admission.plan.map(|plan| plan_name(policy, plan)),
            "limits": limit_reports(policy, admission.plan, admission.limits.as_slice())
                .iter().map(limit_json).collect::<Vec<Value>>(),
            "credits_balance_micros": admission.credits_balance_micros,
        }),
        Decision::Denied(denial) => json!({
            "decision": "denied",
            "reason": reason_json(policy, denial),
            "plan": denial.plan.map(|plan| plan_name(policy, plan)),
            "limits": limit_reports(policy, denial.plan, denial.limits.as_slice())
                .iter().map(limit_json).collect::<Vec<Value>>(),
            "credits_balance_micros": denial.credits_balance_micros,
            "remedies": {
                "credits_needed_micros": denial.remedies.credits_needed_micros,
                "upgrade_to": denial.remedies.upgrade_to.map(|plan| plan_name(policy, plan)),
                "wait_until_ms": denial.remedies.wait_until_ms,
            },
        }),
    }
}

fn reason_json(policy: &Policy, denial: &Denial) -> Value {
    let kind = DENIAL_REASONS[reason_index(&denial.reason)].0;
    let mut fields = match denial.reason {
        DenialReason::ResourceNotCovered { resource } => {
            json!({"resource": resource_name(policy, resource)})
        }
        DenialReason::OverRequestMaximum {
            unit,
            maximum,
            requested,
        } => json!({"unit": unit.name(), "maximum": maximum, "requested": requested}),
        DenialReason::QuotaExhausted {
            limit,
            retry_at_ms,
            retry_after_ms,
            reset_at_ms,
        } => json!({
            "limit": denied_limit_name(policy, denial, limit),
            "retry_at_ms": retry_at_ms,
            "retry_after_ms": retry_after_ms,
            "reset_at_ms": reset_at_ms,
        }),
        DenialReason::ExceedsLimit {
            limit,
            amount,
            requested,
        } => json!({
            "limit": denied_limit_name(policy, denial, limit),
            "amount": amount,
            "requested": requested,
        }),
        DenialReason::InsufficientCredits {
            balance_micros,
            price_micros,
        } => json!({"balance_micros": balance_micros, "price_micros": price_micros}),
        DenialReason::TooManyReservations { open, maximum } => {
            json!({"open": open, "maximum": maximum})
        }
        DenialReason::UnknownKey | DenialReason::NoResources | DenialReason::KeyRevoked => {
            json!({})
        }
    };
    fields["kind"] = json!(kind);
    fields
}

// ---------------------------------------------------------------------------------------------
// Events.

fn quantities_json(quantities: &Quantities) -> Value {
    let map: Map<String, Value> = quantities
        .pairs()
        .map(|(unit, amount)| (unit.name().to_string(), json!(amount)))
        .collect();
    Value::Object(map)
}

/// An event's fields in the order they print.
type Fields = Vec<(&'static str, Value)>;

/// The policy of a generation, if still kept (`Engine::policy_of_generation`): an event's
/// receipt names its plan by an id in the policy it was logged under, which a later swap may
/// give another plan.
pub type PolicyOf<'a> = &'a dyn Fn(u32) -> Option<Arc<Policy>>;

/// The field names of where usage was charged: `charged_to`, and `plan` or `micros`.
const CHARGED: [&str; 3] = ["charged_to", "plan", "micros"];
/// The same for the part of a settle beyond its estimate, each name prefixed `extra_`.
const EXTRA_CHARGED: [&str; 3] = ["extra_charged_to", "extra_plan", "extra_micros"];

/// Where usage was charged, under `names` (`CHARGED` or `EXTRA_CHARGED`): its kind, and the
/// plan or the micros.
fn charged_fields(
    policy_of: PolicyOf<'_>,
    generation: u32,
    charged_to: ChargedTo,
    [kind_name, plan_name, micros_name]: [&'static str; 3],
    fields: &mut Fields,
) {
    let (kind, (detail, value)) = charged_to_fields(policy_of, generation, charged_to);
    fields.push((kind_name, kind));
    let detail = if detail == "plan" {
        plan_name
    } else {
        micros_name
    };
    fields.push((detail, value));
}

/// `charged_to`'s kind and its detail: the plan's name, or the micro-credits charged.
fn charged_to_fields(
    policy_of: PolicyOf<'_>,
    generation: u32,
    charged_to: ChargedTo,
) -> (Value, (&'static str, Value)) {
    let (kind, detail) = match charged_to {
        ChargedTo::PlanQuota { plan } => {
            let name = match policy_of(generation) {
                Some(policy) => plan_name(&policy, plan),
                None => format!(
                    "plan {} of policy generation {generation}, no longer kept",
                    plan.index()
                ),
            };
            ("quota", ("plan", json!(name)))
        }
        ChargedTo::Credits { micros } => ("credits", ("micros", json!(micros))),
        ChargedTo::PayAsYouGo { micros } => ("pay_as_you_go", ("micros", json!(micros))),
    };
    (json!(kind), detail)
}

/// What a give-back or a correction moved on each usage counter, by the counter's name
/// (`usage-bar per rolling:5h`, as a limit on it is named), in that counter's own units: the
/// counters of one request (a plan's 5-hour and weekly limits, a weighted bar counting at
/// prices) measure different things, so their amounts are not added up.
pub fn per_counter(
    policy_of: PolicyOf<'_>,
    generation: u32,
    counters: &[(CounterId, u64, u64)],
) -> Value {
    let policy = policy_of(generation);
    let mut totals: Vec<(String, u128)> = Vec::new();
    for &(counter, _, amount) in counters {
        let spec = policy
            .as_deref()
            .and_then(|policy| Some((policy, policy.counters().get(counter.index())?)));
        let name = match spec {
            Some((policy, spec)) => {
                format!("{} per {}", policy.meter(spec.meter).name, spec.window)
            }
            None => format!(
                "counter {} of policy generation {generation}, no longer kept",
                counter.index()
            ),
        };
        // One counter twice (two buckets of one window): added exactly, in 128 bits.
        match totals.iter_mut().find(|(known, _)| *known == name) {
            Some((_, total)) => *total += u128::from(amount),
            None => totals.push((name, u128::from(amount))),
        }
    }
    let map: Map<String, Value> = totals
        .into_iter()
        .map(|(name, total)| {
            let total = u64::try_from(total)
                .map_or_else(|_| json!(total.to_string()), |total| json!(total));
            (name, total)
        })
        .collect();
    Value::Object(map)
}

fn given_back_fields(policy_of: PolicyOf<'_>, given_back: &GivenBack, fields: &mut Fields) {
    fields.push((
        "quota_given_back",
        per_counter(policy_of, given_back.generation, &given_back.counters),
    ));
    fields.push((
        "credits_micros_given_back",
        json!(given_back.credits_micros),
    ));
    if given_back.payg_micros > 0 {
        fields.push((
            "pay_as_you_go_micros_given_back",
            json!(given_back.payg_micros),
        ));
    }
}

/// An event's own fields (besides seq, time and kind), in a fixed order.
fn event_fields(policy_of: PolicyOf<'_>, body: &EventBody) -> Fields {
    let mut fields = Fields::new();
    let mut put = |name: &'static str, value: Value| fields.push((name, value));
    match body {
        EventBody::UserCreated { user, key } | EventBody::PayAsYouGoKeyCreated { user, key } => {
            put("user", json!(user));
            put("key", json!(key));
        }
        EventBody::TeamCreated { team } => put("team", json!(team)),
        EventBody::KeyRevoked { key } => put("key", json!(key)),
        EventBody::MemberAdded { team, user, key } => {
            put("team", json!(team));
            put("user", json!(user));
            put("key", json!(key));
        }
        EventBody::SeatChanged {
            team,
            user,
            key,
            plan,
        } => {
            put("team", json!(team));
            put("user", json!(user));
            put("key", json!(key));
            put("plan", json!(plan.as_deref().unwrap_or("none")));
        }
        EventBody::CreditsToppedUp { team, micros }
        | EventBody::CreditsWithdrawn { team, micros } => {
            put("team", json!(team));
            put("micros", json!(micros));
        }
        EventBody::PolicySwapped {
            generation,
            document,
        } => {
            put("generation", json!(generation));
            put("document_bytes", json!(document.len()));
        }
        _ => return usage_event_fields(policy_of, body),
    }
    fields
}

fn usage_event_fields(policy_of: PolicyOf<'_>, body: &EventBody) -> Fields {
    let mut fields = Fields::new();
    match body {
        EventBody::UsageAdmitted {
            key,
            resource,
            quantities,
            request_id,
            receipt,
            ..
        } => {
            fields.push(("key", json!(key)));
            fields.push(("resource", json!(resource)));
            fields.push(("quantities", quantities_json(quantities)));
            if let Some(id) = request_id {
                fields.push(("request_id", json!(id)));
            }
            charged_fields(
                policy_of,
                receipt.generation,
                receipt.charged_to,
                CHARGED,
                &mut fields,
            );
        }
        EventBody::RequestDenied {
            request_id,
            key,
            resource,
            quantities,
            decision,
        } => {
            fields.push(("key", json!(key)));
            fields.push(("resource", json!(resource)));
            fields.push(("quantities", quantities_json(quantities)));
            fields.push(("request_id", json!(request_id)));
            if let Decision::Denied(denial) = decision {
                let reason = DENIAL_REASONS[reason_index(&denial.reason)].0;
                fields.push(("reason", json!(reason)));
            }
        }
        EventBody::ReservationOpened { .. } | EventBody::ReservationClosed { .. } => {
            return reservation_event_fields(policy_of, body);
        }
        EventBody::Refunded {
            request_id,
            key,
            given_back,
        } => {
            fields.push(("request_id", json!(request_id)));
            fields.push(("key", json!(key)));
            given_back_fields(policy_of, given_back, &mut fields);
        }
        EventBody::UsageAdjusted {
            key,
            resource,
            quantities,
            usage_at_ms,
            direction,
            generation,
            moved,
        } => {
            fields.push(("key", json!(key)));
            fields.push(("resource", json!(resource)));
            fields.push(("quantities", quantities_json(quantities)));
            fields.push(("usage_at_ms", json!(usage_at_ms)));
            fields.push(("direction", json!(format!("{direction:?}").to_lowercase())));
            // What the correction really moved: a removal takes no more than was counted.
            fields.push(("quota_moved", per_counter(policy_of, *generation, moved)));
        }
        _ => {}
    }
    fields
}

fn reservation_event_fields(policy_of: PolicyOf<'_>, body: &EventBody) -> Fields {
    let mut fields = Fields::new();
    match body {
        EventBody::ReservationOpened {
            reservation,
            key,
            resource,
            estimate,
            expires_at_ms,
            receipt,
            ..
        } => {
            fields.push(("reservation", json!(reservation)));
            fields.push(("key", json!(key)));
            fields.push(("resource", json!(resource)));
            fields.push(("quantities", quantities_json(estimate)));
            fields.push(("expires_at_ms", json!(expires_at_ms)));
            charged_fields(
                policy_of,
                receipt.generation,
                receipt.charged_to,
                CHARGED,
                &mut fields,
            );
        }
        EventBody::ReservationClosed {
            reservation,
            key,
            end,
            given_back,
        } => {
            fields.push(("reservation", json!(reservation)));
            fields.push(("key", json!(key)));
            let mut extra_receipt = None;
            let end = match end {
                ReservationEnd::Settled { settlement, extra } => {
                    fields.push(("actual", quantities_json(&settlement.actual)));
                    extra_receipt = extra.as_deref();
                    "settled"
                }
                ReservationEnd::Voided => "voided",
                ReservationEnd::Expired => "expired",
            };
            fields.push(("end", json!(end)));
            given_back_fields(policy_of, given_back, &mut fields);
            // What a settle for more charged beyond the estimate: billed with the rest.
            if let Some(receipt) = extra_receipt {
                charged_fields(
                    policy_of,
                    receipt.generation,
                    receipt.charged_to,
                    EXTRA_CHARGED,
                    &mut fields,
                );
            }
        }
        _ => {}
    }
    fields
}

/// A field's value on an event line: bare when it reads unambiguously, quoted otherwise.
fn field_text(value: &Value) -> String {
    match value {
        Value::String(text)
            if !text.is_empty()
                && !text.contains(|c: char| c.is_whitespace() || c == '=' || c == '"') =>
        {
            text.clone()
        }
        Value::String(text) => format!("{text:?}"),
        Value::Object(map) => {
            // A name is quoted as a value is: a counter's (`"usage-bar per rolling:5h"`) has
            // spaces, a unit's has none.
            let parts: Vec<String> = map
                .iter()
                .map(|(name, value)| {
                    let name = field_text(&Value::String(name.clone()));
                    format!("{name}={}", field_text(value))
                })
                .collect();
            parts.join(",")
        }
        other => other.to_string(),
    }
}

/// `seq  time  kind  name=value ...`: one line per event.
/// An event's fields, with `team` (the team it concerns: `Engine::team_of_event`) after its key
/// where the event does not name the team itself.
fn fields_with_team(policy_of: PolicyOf<'_>, body: &EventBody, team: Option<&str>) -> Fields {
    let mut fields = event_fields(policy_of, body);
    if let Some(team) = team {
        if !fields.iter().any(|(name, _)| *name == "team") {
            let after_key = fields
                .iter()
                .position(|(name, _)| *name == "key")
                .map_or(0, |at| at + 1);
            fields.insert(after_key, ("team", json!(team)));
        }
    }
    fields
}

/// One event as a line of `tally events`; `team` is the team it concerns.
pub fn event_line(policy_of: PolicyOf<'_>, event: &Event, team: Option<&str>) -> String {
    let mut line = format!(
        "{:>8}  {}  {:<18}",
        event.seq,
        utc_iso8601_ms(event.at_ms),
        event.body.kind()
    );
    for (name, value) in fields_with_team(policy_of, &event.body, team) {
        match value {
            // Quantities read best as they are typed: `requests=1 tokens=200`.
            Value::Object(map) if matches!(name, "quantities" | "actual") => {
                for (unit, amount) in map {
                    let _ = write!(line, " {unit}={}", field_text(&amount));
                }
            }
            value => {
                let _ = write!(line, " {name}={}", field_text(&value));
            }
        }
    }
    line.trim_end().to_string()
}

/// One event as a JSON object of `tally events --json`; `team` is the team it concerns.
pub fn event_json(policy_of: PolicyOf<'_>, event: &Event, team: Option<&str>) -> Value {
    let mut object = Map::new();
    object.insert("seq".into(), json!(event.seq));
    object.insert("at_ms".into(), json!(event.at_ms));
    object.insert("at".into(), json!(utc_iso8601_ms(event.at_ms)));
    object.insert("kind".into(), json!(event.body.kind()));
    object.extend(
        fields_with_team(policy_of, &event.body, team)
            .into_iter()
            .map(|(name, value)| (name.to_string(), value)),
    );
    Value::Object(object)
}

// ---------------------------------------------------------------------------------------------
// Verify and compact.

pub fn verify_text(database: &str, report: &VerifyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "database: {database}");
    let _ = writeln!(out, "records:  {}", grouped(report.records));
    let span = if report.events == 0 {
        String::new()
    } else {
        format!(
            " (sequence numbers {} to {})",
            grouped(report.first_seq),
            grouped(report.last_seq)
        )
    };
    let _ = writeln!(out, "events:   {}{span}", grouped(report.events));
    let snapshot = match (report.snapshot_seq, report.snapshot_matches_replay) {
        (None, _) => "none yet (the log alone holds the state)".to_string(),
        (Some(seq), Some(true)) => {
            format!("at event {}; matches a replay of the log", grouped(seq))
        }
        (Some(seq), Some(false)) => {
            format!(
                "at event {}; DOES NOT match a replay of the log",
                grouped(seq)
            )
        }
        (Some(seq), None) => format!("at event {}; could not be compared", grouped(seq)),
    };
    let _ = writeln!(out, "snapshot: {snapshot}");
    let options = match report.replayed_with_recorded_options {
        true => "replayed with the ones the database's owner recorded",
        false => "replayed with the defaults (the database recorded none it could use)",
    };
    let _ = writeln!(out, "options:  {options}");
    if let Some(torn_tail) = &report.torn_tail {
        let _ = writeln!(out, "note:     {torn_tail}");
    }
    if report.problems.is_empty() {
        let _ = writeln!(out, "problems: none");
    } else {
        let _ = writeln!(out, "problems: {}", report.problems.len());
        for problem in &report.problems {
            let _ = writeln!(out, "  {problem}");
        }
    }
    let verdict = if report.is_sound() { "yes" } else { "NO" };
    let _ = writeln!(out, "sound:    {verdict}");
    out
}

pub fn verify_json(report: &VerifyReport) -> Value {
    json!({
        "sound": report.is_sound(),
        "records": report.records,
        "events": report.events,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "snapshot_seq": report.snapshot_seq,
        "snapshot_matches_replay": report.snapshot_matches_replay,
        "problems": report.problems,
        "replayed_with_recorded_options": report.replayed_with_recorded_options,
        "torn_tail": report.torn_tail,
    })
}

/// `tally events --cursors`: each saved cursor and the event it is after, with how many of
/// the database's places they hold.
pub fn cursors_text(cursors: &[(String, u64)]) -> String {
    let mut out = format!(
        "cursors: {} of {} places\n",
        grouped(cursors.len() as u64),
        grouped(tally_engine::log::MAX_CURSORS)
    );
    let names: Vec<String> = cursors
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    let width = names
        .iter()
        .map(|name| name.chars().count())
        .max()
        .unwrap_or(0);
    for (name, (_, after)) in names.iter().zip(cursors) {
        let _ = writeln!(out, "  {name:<width$}  after event {}", grouped(*after));
    }
    out
}

pub fn cursors_json(cursors: &[(String, u64)]) -> Value {
    json!({
        "cursors": cursors
            .iter()
            .map(|(name, after)| json!({"name": name, "after": after}))
            .collect::<Vec<_>>(),
        "capacity": tally_engine::log::MAX_CURSORS,
    })
}

pub fn compact_text(report: &CompactReport) -> String {
    format!(
        "checkpoint: a snapshot of the whole state at event {}\n\
         removed:    {} events (stamped before the longest window plus the retention, \
         logged before the retention, and before the previous snapshot)\n\
         log:        starts at event {}\n",
        grouped(report.snapshot_seq),
        grouped(report.events_removed),
        grouped(report.first_seq_kept)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A key without a seat, its team holding credits, asking for a resource credits cannot
    /// pay for (no price) is denied "not covered" since 7fa4722: the words must not speak of
    /// a plan the key does not have.
    #[test]
    fn a_seatless_keys_resource_not_covered_names_no_plan_of_its_own() {
        let at_ms = 1_795_363_200_000;
        let policy = Policy::from_toml_str(
            r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }
[resources.free-model]
units = ["requests"]
[plans.Covers]
limits = [{ resource = "free-model", unit = "requests", amount = 10, window = "rolling:5h" }]
"#,
        )
        .expect("a valid policy");
        let engine = tally_engine::Engine::new(
            policy,
            Arc::new(tally_engine::ManualClock::new(at_ms)),
            tally_engine::EngineOptions::default(),
        )
        .expect("an engine");
        engine
            .create_user("ada", "tp-ada", Some(at_ms))
            .expect("user");
        engine
            .top_up("@ada", 1_000_000, Some(at_ms))
            .expect("credits");
        let quantities = [(tally_engine::Unit::Requests, 1)];
        let request = tally_engine::UsageRequest::new("tp-ada", "free-model", &quantities);
        let decision = engine.consume(&request.at(at_ms)).expect("valid");
        let Decision::Denied(denial) = &decision else {
            panic!("{decision:?}");
        };
        assert!(matches!(
            denial.reason,
            DenialReason::ResourceNotCovered { .. }
        ));
        let words = reason_words(&engine.policy(), denial);
        assert!(!words.contains("key's plan"), "{words}");
        assert!(words.contains("any plan the key holds"), "{words}");
        assert!(words.contains("free-model"), "{words}");
    }

    /// `tally consume --json` named the denying limit by its label for people ("m2.7 requests
    /// / rolling:5h") while its `limits` (and the C ABI's `limit_name`) give the engine's name
    /// ("m2.7:requests per rolling:5h"): a script could not find the denying limit among them.
    #[test]
    fn a_denials_json_names_its_limit_as_its_limits_do() {
        let at_ms = 1_795_363_200_000;
        let engine = tally_engine::Engine::new(
            Policy::token_plan(),
            Arc::new(tally_engine::ManualClock::new(at_ms)),
            tally_engine::EngineOptions::default(),
        )
        .expect("an engine");
        engine
            .create_user("ada", "tp-ada", Some(at_ms))
            .expect("user");
        engine
            .assign_seat("@ada", "ada", "Starter", Some(at_ms))
            .expect("seat");
        let consume = |requests: u64| {
            let quantities = [(tally_engine::Unit::Requests, requests)];
            let request = tally_engine::UsageRequest::new("tp-ada", "m2.7", &quantities);
            engine.consume(&request.at(at_ms)).expect("valid")
        };
        let policy = engine.policy();
        for decision in [consume(2_000), consume(1_500), consume(1)] {
            if decision.is_admitted() {
                continue;
            }
            let json = decision_json(&policy, &decision);
            assert_eq!(json["reason"]["limit"], json["limits"][0]["name"], "{json}");
            assert_eq!(json["reason"]["limit"], "m2.7:requests per rolling:5h");
        }
    }

    /// The text report gave the balance in micro-credits (and credits) but what was charged as
    /// a bare number: "8,000 micro-credits (0.01 credits) left; 2,000 charged so far".
    #[test]
    fn a_usage_report_gives_the_credits_charged_in_the_same_units_as_the_balance() {
        let report = UsageReport {
            key: "tp-ada".into(),
            kind: KeyKind::Plan,
            revoked: false,
            user: "ada".into(),
            team: "@ada".into(),
            plan: None,
            limits: Vec::new(),
            credits_balance_micros: 8_000,
            credits_charged_micros: 2_500_000,
            open_reservations: 0,
            payg_micros: 0,
            at_ms: 1_772_456_400_000,
        };
        let text = usage_text(&report);
        assert!(
            text.contains(
                "8,000 micro-credits (0.008 credits) left; \
                 2,500,000 micro-credits (2.50 credits) charged so far"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_field_is_bare_unless_it_could_be_misread() {
        assert_eq!(field_text(&json!("tp-ada")), "tp-ada");
        assert_eq!(field_text(&json!("two words")), "\"two words\"");
        assert_eq!(field_text(&json!("a=b")), "\"a=b\"");
        assert_eq!(field_text(&json!("")), "\"\"");
        assert_eq!(field_text(&json!(42)), "42");
        assert_eq!(
            field_text(&json!({"requests": 1, "tokens": 20})),
            "requests=1,tokens=20"
        );
    }

    #[test]
    fn an_event_line_holds_its_sequence_time_kind_and_fields() {
        let event = Event {
            seq: 7,
            at_ms: 1_772_456_400_250,
            body: EventBody::CreditsToppedUp {
                team: "@ada".into(),
                micros: 5_000_000,
            },
        };
        let policy = Arc::new(Policy::token_plan());
        let policy_of = |_| Some(Arc::clone(&policy));
        assert_eq!(
            event_line(&policy_of, &event, None),
            "       7  2026-03-02T13:00:00.250Z  credits_topped_up  team=@ada micros=5000000"
        );
        assert_eq!(
            event_json(&policy_of, &event, None),
            json!({
                "seq": 7,
                "at_ms": 1_772_456_400_250u64,
                "at": "2026-03-02T13:00:00.250Z",
                "kind": "credits_topped_up",
                "team": "@ada",
                "micros": 5_000_000,
            })
        );
    }

    #[test]
    fn a_denied_request_event_says_which_request_was_denied_and_why() {
        // `tally events` printed a logged denial as `request_denied` and nothing more: which
        // key, resource and request id it was, and why, were in the log but not shown.
        let at_ms = 1_772_456_400_000;
        let engine = tally_engine::Engine::new(
            Policy::token_plan(),
            Arc::new(tally_engine::ManualClock::new(at_ms)),
            tally_engine::EngineOptions::default(),
        )
        .expect("an engine");
        engine.create_user("ada", "tp-ada", None).expect("created");
        let pairs = [(tally_engine::Unit::Requests, 2)];
        let request = tally_engine::UsageRequest::new("tp-ada", "m2.7", &pairs).id("req-9");
        let decision = engine.consume(&request).expect("decided");
        assert!(!decision.is_admitted(), "no seat, no credits");
        let event = Event {
            seq: 9,
            at_ms,
            body: EventBody::RequestDenied {
                request_id: "req-9".into(),
                key: "tp-ada".into(),
                resource: "m2.7".into(),
                quantities: Quantities::new(&pairs).expect("quantities"),
                decision,
            },
        };
        let policy = Arc::new(Policy::token_plan());
        let policy_of = |_| Some(Arc::clone(&policy));
        assert_eq!(
            event_line(&policy_of, &event, None),
            "       9  2026-03-02T13:00:00.000Z  request_denied     key=tp-ada resource=m2.7 \
             requests=2 request_id=req-9 reason=no_resources"
        );
        let json = event_json(&policy_of, &event, None);
        assert_eq!(json["key"], json!("tp-ada"));
        assert_eq!(json["request_id"], json!("req-9"));
        assert_eq!(json["quantities"], json!({"requests": 2}));
        assert_eq!(json["reason"], json!("no_resources"));
    }

    /// An engine on the shared-bar plan (two limits, 5-hour and weekly, on one meter) whose
    /// key used one request under `q1`, and what refunding it gave back.
    fn refunded_on_the_shared_bar() -> (Arc<Policy>, GivenBack) {
        let at_ms = 1_772_456_400_000;
        let engine = tally_engine::Engine::new(
            Policy::token_plan(),
            Arc::new(tally_engine::ManualClock::new(at_ms)),
            tally_engine::EngineOptions::default(),
        )
        .expect("an engine");
        engine.create_user("ada", "tp-ada", None).expect("created");
        engine
            .assign_seat("@ada", "ada", "Bar-Plus", None)
            .expect("seated");
        let pairs = [(tally_engine::Unit::Requests, 1)];
        let request = tally_engine::UsageRequest::new("tp-ada", "m2.7", &pairs).id("q1");
        assert!(engine.consume(&request).expect("decided").is_admitted());
        let refund = engine.refund("q1", None).expect("refunded");
        (engine.policy(), refund.given_back)
    }

    #[test]
    fn a_refund_event_says_what_each_counter_got_back_not_their_sum() {
        // `tally events` printed a refund of one request on the shared-bar plan (2,000
        // micro-credits of bar in its 5-hour window and in its weekly one) as
        // `units_given_back=4000`: the two counters' amounts added up, twice what went back.
        let (policy, given_back) = refunded_on_the_shared_bar();
        let event = Event {
            seq: 6,
            at_ms: 1_772_456_400_000,
            body: EventBody::Refunded {
                request_id: "q1".into(),
                key: "tp-ada".into(),
                given_back: given_back.clone(),
            },
        };
        let policy_of = |_| Some(Arc::clone(&policy));
        let per_counter: Map<String, Value> = given_back
            .counters
            .iter()
            .map(|&(counter, _, amount)| {
                let spec = policy.counter(counter);
                let meter = &policy.meter(spec.meter).name;
                (format!("{meter} per {}", spec.window), json!(amount))
            })
            .collect();
        assert_eq!(per_counter.len(), 2, "the bar's two windows");
        let json = event_json(&policy_of, &event, None);
        assert_eq!(json["quota_given_back"], Value::Object(per_counter.clone()));
        assert!(json.get("units_given_back").is_none(), "{json}");
        let line = event_line(&policy_of, &event, None);
        let expected: Vec<String> = per_counter
            .iter()
            .map(|(counter, amount)| format!("{counter:?}={amount}"))
            .collect();
        assert!(
            line.contains(&format!("quota_given_back={}", expected.join(","))),
            "{line}"
        );
    }

    #[test]
    fn a_correction_event_says_what_it_moved_on_each_counter() {
        // `tally adjust --remove requests=3` on a key that had 1 counted gives back only that
        // one (2,000 on each of the bar's windows), but `tally events` printed the event as
        // `requests=3 direction=remove`: a reader took 3 requests for removed.
        let (policy, counted) = refunded_on_the_shared_bar();
        let moved: Vec<(CounterId, u64, u64)> = counted.counters.clone();
        let event = Event {
            seq: 7,
            at_ms: 1_772_456_401_000,
            body: EventBody::UsageAdjusted {
                key: "tp-ada".into(),
                resource: "m2.7".into(),
                quantities: Quantities::new(&[(tally_engine::Unit::Requests, 3)])
                    .expect("quantities"),
                usage_at_ms: 1_772_456_400_000,
                direction: tally_engine::engine::AdjustmentDirection::Remove,
                generation: counted.generation,
                moved,
            },
        };
        let policy_of = |_| Some(Arc::clone(&policy));
        let json = event_json(&policy_of, &event, None);
        assert_eq!(
            json["quota_moved"],
            per_counter(&policy_of, counted.generation, &counted.counters)
        );
        assert_eq!(json["quota_moved"].as_object().map(Map::len), Some(2));
        let line = event_line(&policy_of, &event, None);
        assert!(line.contains("requests=3"), "{line}");
        assert!(line.contains(" quota_moved=\"usage-bar per "), "{line}");
    }

    #[test]
    fn an_unsound_report_says_so_and_lists_its_problems() {
        let report = VerifyReport {
            records: 2,
            events: 5,
            first_seq: 1,
            last_seq: 6,
            snapshot_seq: Some(4),
            snapshot_matches_replay: Some(false),
            problems: vec!["event 5 follows event 3: a gap".into()],
            replayed_with_recorded_options: false,
            torn_tail: None,
        };
        let text = verify_text("db", &report);
        assert!(text.contains("DOES NOT match"), "{text}");
        assert!(text.contains("  event 5 follows event 3: a gap"), "{text}");
        assert!(text.ends_with("sound:    NO\n"), "{text}");
        assert!(
            text.contains("options:  replayed with the defaults"),
            "{text}"
        );
        assert_eq!(verify_json(&report)["sound"], json!(false));
        assert_eq!(verify_json(&report)["torn_tail"], Value::Null);
        assert!(!text.contains("note:"), "{text}");
    }

    #[test]
    fn a_torn_tail_is_a_note_in_a_sound_report() {
        let report = VerifyReport {
            records: 2,
            events: 5,
            first_seq: 1,
            last_seq: 5,
            torn_tail: Some("log segment x ends in 9 bytes at offset 80".into()),
            ..VerifyReport::default()
        };
        let text = verify_text("db", &report);
        assert!(
            text.contains("note:     log segment x ends in 9 bytes at offset 80\n"),
            "{text}"
        );
        assert!(text.ends_with("sound:    yes\n"), "{text}");
        assert_eq!(
            verify_json(&report)["torn_tail"],
            json!("log segment x ends in 9 bytes at offset 80")
        );
    }
}
