//! The simulation's report: aligned text for a person (a screen or two), or a JSON summary for
//! a program. The JSON holds only what the seed decides (no wall time), so two runs with the same
//! seed print the same bytes.

use std::fmt::Write as _;

use serde_json::{json, Value};
use tally_engine::LimitReport;

use crate::format::{bar, credits, grouped, percent, short_duration, utc_iso8601};
use crate::outcome::{Counts, DENIAL_REASONS};
use crate::scenario::{Access, SeatChangeKind, TeamRole};
use crate::simulate::{RotationSummary, RowSummary, SeatChangeSummary, Summary, TeamSummary};

const BAR_CELLS: usize = 10;

pub fn text(summary: &Summary) -> String {
    let mut out = String::new();
    header(&mut out, summary);
    requests(&mut out, summary);
    plans_table(&mut out, summary);
    usage_bars(&mut out, summary);
    team_credits(&mut out, summary);
    seat_changes(&mut out, summary);
    rotation(&mut out, summary);
    timing(&mut out, summary);
    out
}

fn days(count: u64) -> String {
    match count {
        1 => "1 day".to_string(),
        _ => format!("{count} days"),
    }
}

fn access_words(access: Access) -> &'static str {
    match access {
        Access::Individual => "individual",
        Access::TeamSeat => "team seat",
        Access::CreditsOnly => "team credits only",
        Access::Unseated => "unseated",
        Access::PayAsYouGo => "pay-as-you-go",
    }
}

fn header(out: &mut String, summary: &Summary) {
    let shape = &summary.shape;
    let _ = writeln!(
        out,
        "tally simulate: {} keys, {} from {} to {}, seed {}",
        grouped(shape.keys),
        days(shape.days),
        utc_iso8601(shape.start_ms),
        utc_iso8601(shape.end_ms()),
        shape.seed
    );
    let _ = writeln!(
        out,
        "policy: {} (daily quotas reset at midnight {}); {}-minute slots",
        summary.policy,
        summary.time_zone,
        shape.slot_ms / 60_000
    );
    let kinds: Vec<String> = summary
        .keys_by_access
        .iter()
        .map(|(access, count)| format!("{} {}", grouped(*count), access_words(*access)))
        .collect();
    let _ = writeln!(
        out,
        "keys: {}; {} heavy",
        kinds.join(", "),
        grouped(summary.heavy_keys)
    );
    let _ = writeln!(
        out,
        "engine: {} users, {} named teams, {} keys in all\n",
        grouped(summary.users),
        summary.named_teams,
        grouped(summary.engine_keys)
    );
}

fn requests(out: &mut String, summary: &Summary) {
    let totals = &summary.totals;
    let line = |out: &mut String, label: &str, count: u64, note: String| {
        let share = format!("{:.1}%", share_per_mille(count, totals.sent) as f64 / 10.0);
        let text = format!("  {label:<30}{:>12}  {share:>6}  {note}", grouped(count));
        let _ = writeln!(out, "{}", text.trim_end());
    };
    let _ = writeln!(out, "Requests{:>36}  {:>6}", "count", "share");
    line(out, "sent", totals.sent, String::new());
    line(
        out,
        "admitted from plan quota",
        totals.plan_quota,
        String::new(),
    );
    let credits_note = micro_credits(totals.credits_micros);
    line(out, "charged to credits", totals.credits, credits_note);
    let payg_note = micro_credits(totals.pay_as_you_go_micros);
    line(out, "pay-as-you-go", totals.pay_as_you_go, payg_note);
    line(out, "denied", totals.denied_total(), String::new());
    for (index, (_, words)) in DENIAL_REASONS.iter().enumerate() {
        let count = totals.denied[index];
        // Reservations are not simulated: show that reason only if it ever appears.
        if count > 0 || *words != "too many reservations" {
            line(out, &format!("  {words}"), count, String::new());
        }
    }
    if totals.errors > 0 {
        let kinds: Vec<String> = summary
            .errors
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        line(out, "engine errors", totals.errors, kinds.join(", "));
    }
    let replays_note = format!(
        "{} got their first decision back, counted once",
        grouped(summary.replays_matching)
    );
    note_line(out, "idempotent replays", summary.replays, &replays_note);
    let resets_note = "refused on a daily quota, admitted again after midnight";
    note_line(
        out,
        "daily resets seen",
        summary.daily_resets_seen,
        resets_note,
    );
    let (reclaimed, rounds) = summary.reclaimed_on_its_own;
    let reclaim_note = format!(
        "on its own in {} rounds; {} keys hold {} B at the end",
        grouped(rounds),
        grouped(summary.memory.keys_with_usage),
        grouped(summary.memory.usage_bytes),
    );
    note_line(out, "idle keys' windows freed", reclaimed, &reclaim_note);
    out.push('\n');
}

fn micro_credits(micros: u64) -> String {
    format!(
        "{} micro-credits ({} credits)",
        grouped(micros),
        credits(micros)
    )
}

fn note_line(out: &mut String, label: &str, count: u64, note: &str) {
    let _ = writeln!(out, "  {label:<30}{:>12}  {note}", grouped(count));
}

/// Thousandths, rounded down, for one-decimal percentages.
fn share_per_mille(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        0
    } else {
        (u128::from(part) * 1_000 / u128::from(whole)) as u64
    }
}

fn plans_table(out: &mut String, summary: &Summary) {
    let rows: Vec<Vec<String>> = summary
        .rows
        .iter()
        .filter(|row| row.keys > 0 || row.counts.sent > 0)
        .map(plan_cells)
        .collect();
    write_table(
        out,
        &[
            ("Plan", 18),
            ("keys", 6),
            ("heavy", 6),
            ("quota", 11),
            ("credits", 10),
            ("charged", 10),
            ("denied", 10),
            ("limited", 10),
            ("keys", 8),
        ],
        &rows,
    );
    let _ = writeln!(
        out,
        "  quota: admitted from plan quota; credits: charged to credits (requests, then credits);\n  \
         limited: denied by a plan limit (quota exhausted or exceeds limit), by requests and keys\n"
    );
}

/// A plan row's cells, and what it admitted as pay-as-you-go after them.
fn plan_cells(row: &RowSummary) -> Vec<String> {
    let counts: &Counts = &row.counts;
    let mut cells = vec![
        format!("  {}", row.label),
        grouped(row.keys),
        grouped(row.heavy),
        grouped(counts.plan_quota),
        grouped(counts.credits),
        credits(counts.credits_micros),
        grouped(counts.denied_total()),
        grouped(counts.limited()),
        grouped(row.keys_limited),
    ];
    if counts.pay_as_you_go > 0 {
        cells.push(format!("  +{} payg", grouped(counts.pay_as_you_go)));
    }
    cells
}

/// Writes a table under `columns` (each a heading and its usual width): the first column
/// left-aligned and as wide as its usual width or its widest cell, the others right-aligned
/// and as wide as their usual width or one more than their widest cell, so each starts with
/// a space and a figure wider than usual (a long run's totals, a long plan name) never runs
/// into the one before it. A cell past the columns is written as it is.
fn write_table(out: &mut String, columns: &[(&str, usize)], rows: &[Vec<String>]) {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(index, (heading, usual))| {
            let space = usize::from(index > 0);
            rows.iter()
                .filter_map(|cells| cells.get(index))
                .map(String::as_str)
                .chain(std::iter::once(*heading))
                .map(|cell| cell.chars().count() + space)
                .fold(*usual, usize::max)
        })
        .collect();
    let headings: Vec<String> = columns
        .iter()
        .map(|(heading, _)| heading.to_string())
        .collect();
    for cells in std::iter::once(&headings).chain(rows) {
        let mut line = String::new();
        for (index, cell) in cells.iter().enumerate() {
            match widths.get(index) {
                Some(&width) if index == 0 => {
                    let _ = write!(line, "{cell:<width$}");
                }
                Some(&width) => {
                    let _ = write!(line, "{cell:>width$}");
                }
                None => line.push_str(cell),
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn usage_bars(out: &mut String, summary: &Summary) {
    let end_ms = summary.shape.end_ms();
    let _ = writeln!(
        out,
        "Usage bars at the end of the run ({}), busiest key of each plan",
        utc_iso8601(end_ms)
    );
    for row in &summary.rows {
        let Some(sample) = &row.sample else { continue };
        let heavy = if sample.heavy { ", heavy" } else { "" };
        let _ = writeln!(out, "  {} ({}{heavy})", row.label, sample.key);
        for limit in &sample.limits {
            limit_line(out, limit, end_ms);
        }
    }
    out.push('\n');
}

/// One usage bar: label, bar, used/amount, percent, and when it resets relative to `now_ms`.
pub fn limit_line(out: &mut String, limit: &LimitReport, now_ms: u64) {
    // Relative to the end of the run, whose UTC time heads the section; the JSON has the
    // ISO-8601 times.
    let reset = match limit.reset_at_ms {
        Some(reset_ms) => format!(
            "resets in {}",
            short_duration(reset_ms.saturating_sub(now_ms))
        ),
        None => "nothing counted".to_string(),
    };
    let _ = writeln!(
        out,
        "    {:<39} {} {:>10}/{:<10} {:>3}%  {reset}",
        limit_label(limit),
        bar(limit.used, limit.amount, BAR_CELLS),
        grouped(limit.used),
        grouped(limit.amount),
        percent(limit.used, limit.amount)
    );
}

/// `m2.7:requests per rolling:5h` reads better as `m2.7 requests / rolling:5h`.
pub fn limit_label(limit: &LimitReport) -> String {
    format!("{} / {}", limit.meter.replace(':', " "), limit.window)
}

fn role_words(role: Option<TeamRole>) -> &'static str {
    match role {
        Some(TeamRole::Corporate) => "bought plenty",
        Some(TeamRole::Shoestring) => "bought little, no top-ups",
        Some(TeamRole::Prepaid) => "tops up below 25%",
        None => "",
    }
}

fn team_credits(out: &mut String, summary: &Summary) {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut default_teams: Option<TeamSummary> = None;
    for team in &summary.teams {
        if team.account.role.is_none() {
            default_teams = Some(merge_default_team(default_teams, team));
            continue;
        }
        let label = format!("{} ({})", team.account.team, role_words(team.account.role));
        rows.push(team_cells(&label, team));
    }
    if let Some(merged) = &default_teams {
        let label = format!("{} Default Teams", merged.account.members);
        rows.push(team_cells(&label, merged));
    }
    write_table(
        out,
        &[
            ("Team credits", 36),
            ("members", 8),
            ("start", 12),
            ("top-ups", 12),
            ("charged", 12),
            ("end", 12),
        ],
        &rows,
    );
    let reconciled = summary.teams.iter().all(TeamSummary::reconciles);
    let _ = writeln!(
        out,
        "  every balance is start + top-ups - charged: {}\n",
        if reconciled {
            "yes"
        } else {
            "NO (see the JSON)"
        }
    );
}

fn merge_default_team(merged: Option<TeamSummary>, team: &TeamSummary) -> TeamSummary {
    let mut merged = merged.unwrap_or_else(|| {
        let mut empty = team.clone();
        empty.account.members = 0;
        empty.account.initial_micros = 0;
        empty.mid_run_top_ups = 0;
        empty.mid_run_top_up_micros = 0;
        empty.charged_micros = 0;
        empty.end_micros = 0;
        empty
    });
    merged.account.members += 1;
    merged.account.initial_micros += team.account.initial_micros;
    merged.mid_run_top_ups += team.mid_run_top_ups;
    merged.mid_run_top_up_micros += team.mid_run_top_up_micros;
    merged.charged_micros += team.charged_micros;
    merged.end_micros += team.end_micros;
    merged
}

fn team_cells(label: &str, team: &TeamSummary) -> Vec<String> {
    let top_ups = if team.mid_run_top_ups > 0 {
        format!(
            "{} x{}",
            credits(team.mid_run_top_up_micros),
            team.mid_run_top_ups
        )
    } else {
        "-".to_string()
    };
    vec![
        format!("  {label}"),
        team.account.members.to_string(),
        credits(team.account.initial_micros),
        top_ups,
        credits(team.charged_micros),
        credits(team.end_micros),
    ]
}

fn seat_changes(out: &mut String, summary: &Summary) {
    if summary.seat_changes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "Seat changes mid-window (usage already counted stays counted)"
    );
    for change in &summary.seat_changes {
        seat_change_lines(out, change);
    }
    out.push('\n');
}

fn rotation(out: &mut String, summary: &Summary) {
    let Some(rotation) = &summary.rotation else {
        return;
    };
    let _ = writeln!(
        out,
        "A leaked key revoked, its member given a new one (what it used stays counted)"
    );
    let seat = rotation
        .plan
        .as_deref()
        .map_or_else(|| "no seat".to_string(), |plan| format!("a seat on {plan}"));
    let _ = writeln!(
        out,
        "  revoked   {}  at {}",
        rotation.old_key,
        utc_iso8601(rotation.at_ms),
    );
    let _ = writeln!(
        out,
        "  {:<10}{} issued in its place with {seat}, its windows empty",
        "", rotation.new_key,
    );
    let leaked = &rotation.leaked;
    let _ = writeln!(
        out,
        "  {:<10}then on the revoked key: {} sent, {} admitted, {} denied (key revoked)",
        "",
        grouped(leaked.sent),
        grouped(leaked.admitted()),
        grouped(leaked.key_revoked()),
    );
    let owner = &rotation.owner_after;
    let _ = writeln!(
        out,
        "  {:<10}the member's next 5h on the new key: {} from quota, {} to credits, {} denied",
        "",
        grouped(owner.plan_quota),
        grouped(owner.credits),
        grouped(owner.denied_total()),
    );
    out.push('\n');
}

fn rotation_json(rotation: &RotationSummary) -> Value {
    json!({
        "old_key": rotation.old_key,
        "new_key": rotation.new_key,
        "plan": rotation.plan,
        "at": utc_iso8601(rotation.at_ms),
        "leaked": counts_json(&rotation.leaked),
        "member_next_5h": counts_json(&rotation.owner_after),
    })
}

fn bar_words(limit: &Option<LimitReport>) -> String {
    match limit {
        Some(limit) => format!("{}/{}", grouped(limit.used), grouped(limit.amount)),
        None => "-".to_string(),
    }
}

fn seat_change_lines(out: &mut String, change: &SeatChangeSummary) {
    let kind = match change.kind {
        SeatChangeKind::Upgrade => "upgrade",
        SeatChangeKind::Downgrade => "downgrade",
    };
    let _ = writeln!(
        out,
        "  {kind:<10}{}  {} -> {}  at {}",
        change.key,
        change.from,
        change.to,
        utc_iso8601(change.at_ms),
    );
    let limit = change.before.as_ref().map(limit_label).unwrap_or_default();
    let _ = writeln!(
        out,
        "  {:<10}{limit}: {} before, {} after",
        "",
        bar_words(&change.before),
        bar_words(&change.after),
    );
    let counts = &change.counts_after;
    let _ = writeln!(
        out,
        "  {:<10}next 5h: {} from quota, {} to credits, {} denied ({} quota exhausted)",
        "",
        grouped(counts.plan_quota),
        grouped(counts.credits),
        grouped(counts.denied_total()),
        grouped(counts.quota_exhausted()),
    );
}

fn timing(out: &mut String, summary: &Summary) {
    let seconds = summary.wall.as_secs_f64();
    let decisions = summary.totals.sent + summary.replays;
    let per_second = |count: u64| {
        if seconds > 0.0 {
            grouped((count as f64 / seconds) as u64)
        } else {
            "-".into()
        }
    };
    let _ = writeln!(
        out,
        "Ran {} of traffic in {seconds:.2} s wall time, one thread: {} decisions, {} admitted",
        days(summary.shape.days),
        grouped(decisions),
        grouped(summary.totals.admitted()),
    );
    let _ = writeln!(
        out,
        "  {} decisions/s, {} admissions/s",
        per_second(decisions),
        per_second(summary.totals.admitted()),
    );
}

// ---------------------------------------------------------------------------------------------
// JSON

pub fn json(summary: &Summary) -> Value {
    let shape = &summary.shape;
    json!({
        "parameters": {
            "keys": shape.keys,
            "days": shape.days,
            "seed": shape.seed,
            "policy": summary.policy,
            "time_zone": summary.time_zone,
            "start": utc_iso8601(shape.start_ms),
            "end": utc_iso8601(shape.end_ms()),
            "slot_ms": shape.slot_ms,
        },
        "accounts": {
            "users": summary.users,
            "named_teams": summary.named_teams,
            "engine_keys": summary.engine_keys,
            "heavy_keys": summary.heavy_keys,
            "keys_by_access": summary.keys_by_access.iter()
                .map(|(access, count)| (access_name(*access).to_string(), json!(count)))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "requests": counts_json(&summary.totals),
        "errors": summary.errors.iter()
            .map(|(kind, count)| (kind.to_string(), json!(count)))
            .collect::<serde_json::Map<String, Value>>(),
        "request_ids": summary.requests_with_ids,
        "replays": summary.replays,
        "replays_matching_first_decision": summary.replays_matching,
        "daily_resets_seen": summary.daily_resets_seen,
        "memory": json!({
            "keys": summary.memory.keys,
            "keys_with_usage": summary.memory.keys_with_usage,
            "usage_bytes": summary.memory.usage_bytes,
            "table_bytes": summary.memory.table_bytes,
            "idle_keys_reclaimed": summary.reclaimed_on_its_own.0,
            "reclaim_rounds": summary.reclaimed_on_its_own.1,
        }),
        "plans": summary.rows.iter().map(row_json).collect::<Vec<Value>>(),
        "teams": summary.teams.iter().map(team_json).collect::<Vec<Value>>(),
        "seat_changes": summary.seat_changes.iter().map(seat_change_json).collect::<Vec<Value>>(),
        "key_rotation": summary.rotation.as_ref().map(rotation_json),
    })
}

fn access_name(access: Access) -> &'static str {
    match access {
        Access::Individual => "individual",
        Access::TeamSeat => "team_seat",
        Access::CreditsOnly => "credits_only",
        Access::Unseated => "unseated",
        Access::PayAsYouGo => "pay_as_you_go",
    }
}

fn counts_json(counts: &Counts) -> Value {
    let denied: serde_json::Map<String, Value> = DENIAL_REASONS
        .iter()
        .zip(counts.denied)
        .map(|((name, _), count)| (name.to_string(), json!(count)))
        .collect();
    json!({
        "sent": counts.sent,
        "admitted": counts.admitted(),
        "plan_quota": counts.plan_quota,
        "credits": counts.credits,
        "credits_micros": counts.credits_micros,
        "pay_as_you_go": counts.pay_as_you_go,
        "pay_as_you_go_micros": counts.pay_as_you_go_micros,
        "denied": counts.denied_total(),
        "denied_by_reason": denied,
        "errors": counts.errors,
    })
}

fn row_json(row: &RowSummary) -> Value {
    let sample = row.sample.as_ref().map(|sample| {
        json!({
            "key": sample.key,
            "heavy": sample.heavy,
            "limits": sample.limits.iter().map(|limit| json!({
                "name": limit.name,
                "used": limit.used,
                "amount": limit.amount,
                "reset_at": limit.reset_at_ms.map(utc_iso8601),
            })).collect::<Vec<Value>>(),
        })
    });
    json!({
        "plan": row.label,
        "keys": row.keys,
        "heavy_keys": row.heavy,
        "keys_limited": row.keys_limited,
        "requests": counts_json(&row.counts),
        "busiest_key_at_end": sample,
    })
}

fn team_json(team: &TeamSummary) -> Value {
    json!({
        "team": team.account.team,
        "role": match team.account.role {
            Some(TeamRole::Corporate) => "corporate",
            Some(TeamRole::Shoestring) => "shoestring",
            Some(TeamRole::Prepaid) => "prepaid",
            None => "default_team",
        },
        "members": team.account.members,
        "seated": team.account.seated,
        "credits_only": team.account.credits_only,
        "initial_micros": team.account.initial_micros,
        "mid_run_top_ups": team.mid_run_top_ups,
        "mid_run_top_up_micros": team.mid_run_top_up_micros,
        "topped_up_micros": team.topped_up_micros(),
        "charged_micros": team.charged_micros,
        "end_micros": team.end_micros,
    })
}

fn seat_change_json(change: &SeatChangeSummary) -> Value {
    let bar = |limit: &Option<LimitReport>| {
        limit
            .as_ref()
            .map(|limit| json!({"limit": limit.name, "used": limit.used, "amount": limit.amount}))
    };
    json!({
        "kind": match change.kind {
            SeatChangeKind::Upgrade => "upgrade",
            SeatChangeKind::Downgrade => "downgrade",
        },
        "key": change.key,
        "from": change.from,
        "to": change.to,
        "at": utc_iso8601(change.at_ms),
        "before": bar(&change.before),
        "after": bar(&change.after),
        "next_5h": counts_json(&change.counts_after),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tally_engine::MemoryStats;

    use super::*;
    use crate::scenario::{CreditAccount, Shape};

    fn summary(rows: Vec<RowSummary>, teams: Vec<TeamSummary>) -> Summary {
        Summary {
            shape: Shape {
                keys: 200,
                days: 60,
                seed: 1,
                start_ms: crate::simulate::START_MS,
                slot_ms: crate::simulate::SLOT_MS,
            },
            policy: "the shipped Token Plan policy".into(),
            time_zone: "Asia/Shanghai".into(),
            users: 200,
            engine_keys: 240,
            named_teams: 1,
            keys_by_access: vec![(Access::TeamSeat, 200)],
            heavy_keys: 4,
            totals: Counts::default(),
            rows,
            teams,
            seat_changes: Vec::new(),
            rotation: None,
            requests_with_ids: 0,
            replays: 0,
            replays_matching: 0,
            daily_resets_seen: 0,
            errors: Vec::new(),
            memory: MemoryStats {
                keys: 240,
                keys_with_usage: 200,
                usage_bytes: 1_000,
                table_bytes: 1_000,
            },
            reclaimed_on_its_own: (0, 0),
            wall: Duration::from_secs(1),
        }
    }

    /// The line of `text` that starts (after its indent) with `label`.
    fn line_of<'a>(text: &'a str, label: &str) -> &'a str {
        text.lines()
            .find(|line| line.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no line for {label} in:\n{text}"))
    }

    #[test]
    fn a_figure_wider_than_its_column_never_runs_into_the_one_before_it() {
        // A 60-day run of 200 keys: a prepaid team topped up 73 times, 1,971 credits in all.
        let team = TeamSummary {
            account: CreditAccount {
                team: "initech".into(),
                role: Some(TeamRole::Prepaid),
                members: 18,
                seated: 15,
                credits_only: 3,
                initial_micros: 27_000_000,
            },
            mid_run_top_ups: 73,
            mid_run_top_up_micros: 1_971_000_000,
            charged_micros: 1_976_180_000,
            end_micros: 21_820_000,
        };
        // A plan named to fill its column, with a long run's counts.
        let counts = Counts {
            sent: 2_345_678_901,
            plan_quota: 1_234_567_890,
            credits: 11_111_111,
            credits_micros: 123_456_789_000_000,
            denied: [1_000_000_000, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Counts::default()
        };
        let row = RowSummary {
            label: "Ultra-Highspeed2".into(),
            keys: 250_000,
            heavy: 4_000,
            keys_limited: 100_000,
            counts,
            sample: None,
        };
        let text = text(&summary(vec![row], vec![team]));
        let team_line = line_of(&text, "initech");
        let words: Vec<&str> = team_line.split_whitespace().collect();
        assert_eq!(
            &words[words.len() - 6..],
            ["18", "27.00", "1,971.00", "x73", "1,976.18", "21.82"],
            "{team_line}"
        );
        let plan_line = line_of(&text, "Ultra-Highspeed2");
        let words: Vec<&str> = plan_line.split_whitespace().collect();
        assert_eq!(
            words,
            [
                "Ultra-Highspeed2",
                "250,000",
                "4,000",
                "1,234,567,890",
                "11,111,111",
                "123,456,789.00",
                "1,000,000,000",
                "0",
                "100,000",
            ],
            "{plan_line}"
        );
    }
}
