//! Text for people: grouped numbers, credits, usage bars, UTC timestamps and short durations.
//! Pure functions, so the report's look is tested without running a simulation.

const MICROS_PER_CREDIT: u64 = 1_000_000;
const MS_PER_SECOND: u64 = 1_000;
const MS_PER_MINUTE: u64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: u64 = 60 * MS_PER_MINUTE;
const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;

/// `1234567` as `1,234,567`.
pub fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// Micro-credits as credits with two decimals, e.g. `1,234.57`.
pub fn credits(micros: u64) -> String {
    // Round half up to the cent without going through floating point (or past u64::MAX).
    let cents = ((u128::from(micros) + u128::from(MICROS_PER_CREDIT / 200))
        / u128::from(MICROS_PER_CREDIT / 100)) as u64;
    format!("{}.{:02}", grouped(cents / 100), cents % 100)
}

/// Micro-credits as credits, exactly: two decimals, more where the amount needs them
/// (`0.025`, `0.000011`), for a figure printed beside its micro-credits, where a rounded one
/// would state another amount (a charge of 1,000 as `0.00`).
pub fn credits_exact(micros: u64) -> String {
    let fraction = format!("{:06}", micros % MICROS_PER_CREDIT);
    let significant = fraction.trim_end_matches('0');
    let shown = if significant.len() <= 2 {
        &fraction[..2]
    } else {
        significant
    };
    format!("{}.{shown}", grouped(micros / MICROS_PER_CREDIT))
}

/// `part / whole` as a whole percentage, rounded down so 99.9% never shows as 100%.
pub fn percent(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    (u128::from(part) * 100 / u128::from(whole)) as u64
}

/// A usage bar such as `[#####.....]` for 52%: `width` cells filled in proportion, except that
/// any usage at all shows one `#` and only a full limit fills every cell.
pub fn bar(used: u64, amount: u64, width: usize) -> String {
    let filled = if amount == 0 || used >= amount {
        width
    } else if used == 0 {
        0
    } else {
        let proportional = (u128::from(used) * width as u128 / u128::from(amount)) as usize;
        proportional.clamp(1, width.saturating_sub(1))
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// A duration as `3h12m`, `2d4h`, `45s`: the two largest units, enough to plan a retry.
pub fn short_duration(ms: u64) -> String {
    let units = [
        (MS_PER_DAY, "d"),
        (MS_PER_HOUR, "h"),
        (MS_PER_MINUTE, "m"),
        (MS_PER_SECOND, "s"),
    ];
    let mut parts = Vec::new();
    let mut rest = ms;
    for (scale, name) in units {
        if rest >= scale || (!parts.is_empty() && parts.len() < 2) {
            parts.push(format!("{}{name}", rest / scale));
            rest %= scale;
        }
        if parts.len() == 2 {
            break;
        }
    }
    if parts.is_empty() {
        return "0s".into();
    }
    parts.concat()
}

/// Like `short_duration`, rounded up to the last unit it shows (`1h0m14s` as `1h1m`): for a
/// wait, so that waiting as long as it says is long enough.
pub fn short_duration_rounded_up(ms: u64) -> String {
    // The units `short_duration` shows are the largest one `ms` reaches and the next below it
    // (seconds alone below a second): round up to the second of the two.
    let scales = [MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE, MS_PER_SECOND];
    let largest = scales
        .iter()
        .position(|scale| ms >= *scale)
        .unwrap_or(scales.len() - 1);
    let precision = scales[(largest + 1).min(scales.len() - 1)];
    short_duration(ms.div_ceil(precision).saturating_mul(precision))
}

/// Milliseconds since the Unix epoch as UTC ISO-8601, e.g. `2026-03-02T01:00:00Z`.
pub fn utc_iso8601(ms: u64) -> String {
    let days = ms / MS_PER_DAY;
    let (year, month, day) = civil_from_days(days);
    let of_day = ms % MS_PER_DAY;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / MS_PER_HOUR,
        of_day % MS_PER_HOUR / MS_PER_MINUTE,
        of_day % MS_PER_MINUTE / MS_PER_SECOND,
    )
}

/// Like `utc_iso8601`, to the millisecond: `2026-03-02T01:00:00.250Z` (event times).
pub fn utc_iso8601_ms(ms: u64) -> String {
    let seconds = utc_iso8601(ms);
    let whole = seconds.trim_end_matches('Z');
    format!("{whole}.{:03}Z", ms % MS_PER_SECOND)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch (tally's timestamps are unsigned).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn a_wait_is_rounded_up_to_the_last_unit_shown() {
        assert_eq!(short_duration_rounded_up(0), "0s");
        assert_eq!(short_duration_rounded_up(1), "1s");
        assert_eq!(short_duration_rounded_up(59_001), "1m0s");
        assert_eq!(short_duration_rounded_up(MS_PER_HOUR), "1h0m");
        assert_eq!(short_duration_rounded_up(MS_PER_HOUR + 1), "1h1m");
        assert_eq!(short_duration_rounded_up(MS_PER_DAY - 1), "1d0h");
        assert_eq!(short_duration_rounded_up(2 * MS_PER_DAY + 1), "2d1h");
        assert_eq!(
            short_duration_rounded_up(u64::MAX),
            short_duration(u64::MAX)
        );
    }

    #[test]
    fn exact_credits_state_every_micro_credit() {
        assert_eq!(credits_exact(0), "0.00");
        assert_eq!(credits_exact(11), "0.000011");
        assert_eq!(credits_exact(1_000), "0.001");
        assert_eq!(credits_exact(25_000), "0.025");
        assert_eq!(credits_exact(5_000_000), "5.00");
        assert_eq!(credits_exact(1_234_500_000), "1,234.50");
        assert_eq!(credits_exact(1_234_567_890), "1,234.56789");
        assert_eq!(credits_exact(u64::MAX), "18,446,744,073,709.551615");
    }

    #[test]
    fn credits_show_two_decimals_rounded_half_up() {
        assert_eq!(credits(0), "0.00");
        assert_eq!(credits(4_999), "0.00");
        assert_eq!(credits(5_000), "0.01");
        assert_eq!(credits(1_234_567_890), "1,234.57");
        // The largest amount rounds up past u64::MAX micro-credits without overflowing.
        assert_eq!(credits(u64::MAX), "18,446,744,073,709.55");
    }

    #[test]
    fn a_bar_is_proportional_shows_any_use_and_is_full_only_at_the_limit() {
        assert_eq!(bar(0, 100, 10), "[..........]");
        assert_eq!(bar(1, 100, 10), "[#.........]");
        assert_eq!(bar(52, 100, 10), "[#####.....]");
        assert_eq!(bar(99, 100, 10), "[#########.]");
        assert_eq!(bar(100, 100, 10), "[##########]");
        assert_eq!(bar(250, 100, 10), "[##########]");
    }

    #[test]
    fn percentages_round_down() {
        assert_eq!(percent(999, 1_000), 99);
        assert_eq!(percent(1_000, 1_000), 100);
        assert_eq!(percent(5, 0), 0);
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(45_000), "45s");
        assert_eq!(
            short_duration(3 * MS_PER_HOUR + 12 * MS_PER_MINUTE + 5_000),
            "3h12m"
        );
        assert_eq!(short_duration(3 * MS_PER_HOUR), "3h0m");
        assert_eq!(short_duration(2 * MS_PER_DAY + 4 * MS_PER_HOUR), "2d4h");
    }

    #[test]
    fn timestamps_print_as_utc_iso_8601() {
        assert_eq!(utc_iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_iso8601(1_772_413_200_000), "2026-03-02T01:00:00Z");
        // A leap day and the last millisecond of a year.
        assert_eq!(utc_iso8601(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_iso8601(1_735_689_599_999), "2024-12-31T23:59:59Z");
        assert_eq!(
            utc_iso8601_ms(1_735_689_599_999),
            "2024-12-31T23:59:59.999Z"
        );
        assert_eq!(utc_iso8601_ms(7), "1970-01-01T00:00:00.007Z");
    }
}
